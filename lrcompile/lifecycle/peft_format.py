"""PEFT's adapter format in and out: `save_adapter` writes what `PeftModel.from_pretrained` reads, `load_adapter`
installs a PEFT adapter directory as lrcompile adapters.

A PEFT directory holds `adapter_config.json` and `adapter_model.safetensors`, keyed
`base_model.model.<module path>.lora_A.weight` / `lora_B.weight` (+ `lora_magnitude_vector` for DoRA); VeRA keeps
`vera_lambda_b` / `vera_lambda_d` per module and one projection pair `base_model.vera_A` / `base_model.vera_B`.
The math matches ours (PEFT is the reference semantics of lrcompile's LoRA, DoRA and VeRA): s = α/r or α/√r
(rsLoRA), DoRA's magnitude over the detached row norm of W + s·BA, VeRA's projections sliced to each layer's
shape. What PEFT's format cannot say (NOBLE, a functional site that is no module, PiSSA's changed base weight,
several adapter kinds at once) is a one-line error naming the site.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from typing import Optional

import torch
from torch import nn

from .. import compat
from ..errors import PlanError, first_line
from ..families.adapters.dora import DoRA
from ..families.adapters.lora import Adapter, LoRA
from ..families.adapters.vera import VeRA
from ..policy.peft import pattern_key
from ..runtime import attach as store

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def unwrap(model: nn.Module) -> nn.Module:
    """The module a `torch.compile` wrapper holds (the wrapper's state_dict names carry a prefix)."""
    return compat.compiled_original(model) or model


def _adapters(model: nn.Module) -> list[tuple[str, Adapter]]:
    from ..experts.bank import ExpertBank
    from ..mha.module import Factored

    out = []
    for path, mod in model.named_modules():
        if (isinstance(mod, ExpertBank) and any(not p.family.compressing for p in mod.plans.values())) or (
            isinstance(mod, Factored) and not mod.family.compressing
        ):
            what = "MoE experts (PEFT target_parameters)" if isinstance(mod, ExpertBank) else "nn.MultiheadAttention"
            raise PlanError(f"save_adapter: site {path!r}: LoRA on {what} is not written in PEFT's format yet")
        if not isinstance(mod, Adapter):
            continue
        if path.rpartition(".")[2].startswith(store.PREFIX):
            raise PlanError(
                f"save_adapter: site {path!r} is a functional site (F.linear on a bare parameter, its adapter "
                "attached beside the module): PEFT adapts modules only"
            )
        if not isinstance(mod, (LoRA, DoRA, VeRA)):
            raise PlanError(f"save_adapter: site {path!r} is {mod.name}: PEFT has no such adapter type")
        if getattr(mod.cfg, "init", None) == "pissa":
            raise PlanError(
                f"save_adapter: site {path!r} was initialised with pissa, which changed its base weight: a PEFT "
                "adapter applies to the original base model"
            )
        out.append((path, mod))
    if not out:
        raise PlanError("save_adapter: the model has no LoRA, DoRA or VeRA site")
    kinds = {type(m) for _, m in out}
    if len(kinds) > 1:
        first = {k: next(p for p, m in out if type(m) is k) for k in kinds}
        a, b = sorted(first.items(), key=lambda kv: kv[1])[:2]
        raise PlanError(
            f"save_adapter: sites {a[1]!r} ({a[0].name}) and {b[1]!r} ({b[0].name}) differ in kind: one PEFT "
            "adapter has one"
        )
    return out


def _is_conv1d(mod: Adapter) -> bool:
    layout = getattr(mod, "original_layout", None)
    return layout is not None and layout[0].__name__ == "Conv1D"


def _common(values: dict, what: str):
    """The single value of `values` (path -> value); else a one-line error naming two sites that differ."""
    distinct = list(dict.fromkeys(values.values()))
    if len(distinct) > 1:
        a = next(p for p, v in values.items() if v == distinct[0])
        b = next(p for p, v in values.items() if v == distinct[1])
        raise PlanError(
            f"save_adapter: sites {a!r} and {b!r} differ in {what} ({distinct[0]!r} vs {distinct[1]!r}): "
            "PEFT's format has one"
        )
    return distinct[0]


def _lora_config(sites: list[tuple[str, Adapter]]) -> tuple[dict, dict]:
    rslora = any(bool(m.cfg.rslora) for _, m in sites)  # α follows from the scaling: any choice is exact
    ranks = {p: int(m.lora_A.shape[0]) for p, m in sites}
    alphas = {}
    for p, m in sites:
        s, r = float(m.scaling), ranks[p]
        alphas[p] = s * (math.sqrt(r) if rslora else r)
    r0 = collections.Counter(ranks.values()).most_common(1)[0][0]
    a0 = collections.Counter(alphas.values()).most_common(1)[0][0]
    # full, escaped paths: PEFT reads the keys as regexes matched at the end of a module path
    rank_pattern = {re.escape(p): r for p, r in ranks.items() if r != r0}
    alpha_pattern = {re.escape(p): a for p, a in alphas.items() if a != a0}
    for p in ranks:  # the patterns resolve as PEFT will resolve them
        got_r = rank_pattern.get(pattern_key(rank_pattern, p), r0)
        got_a = alpha_pattern.get(pattern_key(alpha_pattern, p), a0)
        if (got_r, got_a) != (ranks[p], alphas[p]):
            raise PlanError(f"save_adapter: site {p!r}: its rank and alpha cannot be told apart from another site's")
    cfg = {
        "peft_type": "LORA",
        "r": r0,
        "lora_alpha": a0,
        "use_rslora": rslora,
        "use_dora": isinstance(sites[0][1], DoRA),
        "lora_dropout": float(_common({p: float(m.cfg.dropout) for p, m in sites}, "dropout")),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
        "lora_bias": False,
    }
    tensors = {}
    for p, m in sites:
        tensors[f"{PREFIX}{p}.lora_A.weight"] = m.lora_A
        tensors[f"{PREFIX}{p}.lora_B.weight"] = m.lora_B
        if isinstance(m, DoRA):
            tensors[f"{PREFIX}{p}.lora_magnitude_vector"] = m.magnitude
    return cfg, tensors


def _vera_config(sites: list[tuple[str, Adapter]]) -> tuple[dict, dict]:
    A = _common({p: id(m.vera_A) for p, m in sites}, "VeRA projections (several pairs)")
    B = _common({p: id(m.vera_B) for p, m in sites}, "VeRA projections (several pairs)")
    mod0 = sites[0][1]
    assert id(mod0.vera_A) == A and id(mod0.vera_B) == B
    in_max = max(m.in_features for _, m in sites)
    out_max = max(m.out_features for _, m in sites)
    if mod0.vera_A.shape[1] != in_max or mod0.vera_B.shape[0] != out_max:
        raise PlanError(
            f"save_adapter: the VeRA projections are {tuple(mod0.vera_A.shape)}/{tuple(mod0.vera_B.shape)}, not "
            f"sized to these sites ({in_max} in, {out_max} out max) as PEFT sizes its pair"
        )
    cfg = {
        "peft_type": "VERA",
        "r": int(_common({p: int(m.lambda_d.shape[0]) for p, m in sites}, "rank")),
        "vera_dropout": float(_common({p: float(m.cfg.dropout) for p, m in sites}, "dropout")),
        "d_initial": float(mod0.cfg.d_initial),
        "projection_prng_key": int(mod0.cfg.seed),
        "save_projection": True,
        "init_weights": True,
    }
    tensors = {"base_model.vera_A": mod0.vera_A, "base_model.vera_B": mod0.vera_B}
    for p, m in sites:
        tensors[f"{PREFIX}{p}.vera_lambda_b"] = m.lambda_b
        tensors[f"{PREFIX}{p}.vera_lambda_d"] = m.lambda_d
    return cfg, tensors


def save_adapter(
    model: nn.Module,
    directory: str,
    *,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = None,
) -> str:
    """Write the model's LoRA / rsLoRA / DoRA (or VeRA) sites as a PEFT adapter directory; returns its path.
    `base_model_name_or_path` defaults to the HF config's `name_or_path`."""
    from safetensors.torch import save_file

    model = unwrap(model)
    sites = _adapters(model)
    cfg, tensors = (_vera_config if isinstance(sites[0][1], VeRA) else _lora_config)(sites)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    cfg.update(
        target_modules=sorted(p for p, _ in sites),  # full paths: PEFT matches a list entry exactly or as a suffix
        fan_in_fan_out=any(_is_conv1d(m) for _, m in sites),  # GPT-2's Conv1D stores W as (in, out)
        bias="none",
        modules_to_save=None,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        inference_mode=True,
    )
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.path.join(directory, WEIGHTS_NAME))
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return directory


MAX_CONFIG_BYTES = 1 << 20
LORA_KEYS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude"}
VERA_KEYS = {"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"}
VERA_PAIR = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}
FLOATS = ("F16", "BF16", "F32", "F64")


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise PlanError(f"load_adapter: {CONFIG_NAME} not found in {directory}")
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise PlanError(f"load_adapter: {CONFIG_NAME}: larger than {MAX_CONFIG_BYTES} bytes")

    def no_constant(name):
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise PlanError(f"load_adapter: {CONFIG_NAME}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise PlanError(f"load_adapter: {CONFIG_NAME}: a mapping of PEFT config fields, got {type(data).__name__}")
    return data


def _module_shape(mod: nn.Module) -> Optional[tuple[int, int]]:
    """(in, out) of a module lrcompile installs adapters on: nn.Linear, or HF's Conv1D (weight stored (in, out))."""
    w = getattr(mod, "weight", None)
    if isinstance(mod, nn.Linear) and isinstance(w, nn.Parameter) and w.dim() == 2:
        return w.shape[1], w.shape[0]
    if type(mod).__name__ == "Conv1D" and isinstance(w, nn.Parameter) and w.dim() == 2:
        return w.shape[0], w.shape[1]
    return None


def _expected(model: nn.Module, policy, peft_type: str) -> dict[str, tuple]:
    """file key -> (module path, attribute, expected shape) for every module the config targets."""
    out, vera_in, vera_out, rank = {}, 0, 0, None
    for path, mod in model.named_modules():
        rule = policy.match(path) if path else None
        if rule is None or rule.config is None:
            continue
        shape = _module_shape(mod)
        if shape is None:
            raise PlanError(
                f"load_adapter: {CONFIG_NAME}: targets {path!r} ({type(mod).__name__}); lrcompile adapts "
                "nn.Linear and Conv1D modules"
            )
        n_in, n_out = shape
        r = rule.config.rank
        if peft_type == "VERA":
            vera_in, vera_out, rank = max(vera_in, n_in), max(vera_out, n_out), r
            out[f"{PREFIX}{path}.vera_lambda_b"] = (path, "lambda_b", (n_out,))
            out[f"{PREFIX}{path}.vera_lambda_d"] = (path, "lambda_d", (r,))
            continue
        out[f"{PREFIX}{path}.lora_A.weight"] = (path, "lora_A", (r, n_in))
        out[f"{PREFIX}{path}.lora_B.weight"] = (path, "lora_B", (n_out, r))
        if rule.method == "dora":
            out[f"{PREFIX}{path}.lora_magnitude_vector"] = (path, "magnitude", (n_out,))
    if rank is not None:
        out["base_model.vera_A"] = (None, "vera_A", (rank, vera_in))
        out["base_model.vera_B"] = (None, "vera_B", (vera_out, rank))
    return out


def _check_weights(path: str, expected: dict, optional: set) -> None:
    """Keys, dtypes and shapes of the safetensors file, read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is one message
        raise PlanError(f"load_adapter: {WEIGHTS_NAME}: not a readable safetensors file ({first_line(e)})") from None
    for key, (dtype, shape) in header.items():
        if key not in expected:
            raise PlanError(
                f"load_adapter: {WEIGHTS_NAME}: {key!r} is no tensor of an adapter the config installs on this "
                f"model ({len(set(header) - set(expected))} such keys)"
            )
        if dtype not in FLOATS:
            raise PlanError(f"load_adapter: {WEIGHTS_NAME}: {key!r} has dtype {dtype} (float expected)")
        if shape != expected[key][2]:
            raise PlanError(
                f"load_adapter: {WEIGHTS_NAME}: {key!r} has shape {shape}, the config and model give {expected[key][2]}"
            )
    missing = [k for k in expected if k not in header and k not in optional]
    if missing:
        raise PlanError(f"load_adapter: {WEIGHTS_NAME}: {missing[0]!r} missing ({len(missing)} missing)")


def load_adapter(model: nn.Module, directory: str, example_inputs=None) -> nn.Module:
    """Install the PEFT adapter in `directory` on `model` as lrcompile adapters (through `lrcompile.rewrite`, so
    they compile, fuse, merge and hot-swap like our own) and load its weights. PEFT adapts nn.Linear / Conv1D
    modules by name, so no example inputs are needed (given, the sites are traced as `rewrite` traces them).
    Everything in the directory is checked (config fields, keys, dtypes, shapes) before the model is touched."""
    from safetensors import safe_open

    from ..plan.rewrite import rewrite
    from ..policy.peft import peft_policy

    target = unwrap(model)
    fields = _read_config(directory)
    policy = peft_policy(fields, CONFIG_NAME, weights_given=True)
    peft_type = fields["peft_type"]
    expected = _expected(target, policy, peft_type)
    if not expected:
        raise PlanError(f"load_adapter: {CONFIG_NAME}: target_modules match no module of the model")
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise PlanError(f"load_adapter: {WEIGHTS_NAME} not found in {directory}")
    # VeRA without saved projections regenerates them from projection_prng_key, as PEFT does
    optional = set(VERA_PAIR) if peft_type == "VERA" and not fields.get("save_projection", True) else set()
    _check_weights(weights, expected, optional)
    rewrite(target, policy, example_inputs)
    installed = {p: m for p, m in target.named_modules() if getattr(m, "policy_digest", None) == policy.digest}
    wanted = {p for p, _, _ in expected.values() if p is not None}
    if set(installed) != wanted:
        odd = sorted(wanted ^ set(installed))[0]
        raise PlanError(
            f"load_adapter: site {odd!r}: rewrite installed {sorted(installed)} but the file adapts {sorted(wanted)}"
        )
    with safe_open(weights, framework="pt") as f, torch.no_grad():
        for key in f.keys():
            path, attr, _ = expected[key]
            mod = installed[path] if path is not None else next(iter(installed.values()))
            dst = getattr(mod, attr)
            dst.copy_(f.get_tensor(key).to(dtype=dst.dtype, device=dst.device))
    return model
