"""PEFT's adapter format in and out (lrcompile.save_adapter / load_adapter), checked against PEFT itself on HF
models built from small configs."""

import copy
import json
import re

import pytest
import torch

import lrcompile
from lrcompile.families.adapters.dora import DoRA
from lrcompile.families.adapters.lora import LoRA
from lrcompile.families.adapters.vera import VeRA

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama():
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def bert():
    cfg = transformers.BertConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, vocab_size=50
    )
    return transformers.BertModel(cfg).eval()


# model, PEFT-style targets, one module given another rank and alpha (rank_pattern / alpha_pattern)
MODELS = {
    "gpt2": (gpt2, ["c_attn", "c_fc"], "transformer.h.1.mlp.c_fc"),
    "llama": (llama, ["q_proj", "v_proj", "down_proj"], "model.layers.1.self_attn.q_proj"),
    "bert": (bert, ["query", "value", "dense"], "encoder.layer.1.attention.self.query"),
}
METHODS = {"lora": ("lora", {}), "rslora": ("lora", {"rslora": True}), "dora": ("dora", {})}


def ids():
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def out(model, x):
    with torch.no_grad():
        y = model(x)
    return y.logits if hasattr(y, "logits") else y.last_hidden_state


def perturb(model, scale=0.3):
    """Random non-zero values in every trainable (adapter) tensor: B = 0 would hide a wrong layout."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def ours_with(make, targets, special, method, opts):
    torch.manual_seed(0)
    base = make()
    model = copy.deepcopy(base)
    rules = [
        {"match": [special], "method": method, "rank": 2, "alpha": 3.0, **opts},
        {"match": targets, "method": method, "rank": 4, "alpha": 8.0, **opts},
    ]
    lrcompile.rewrite(model, {"defaults": {"min_features": 0}, "rules": rules}, (ids(),))
    perturb(model)
    return base, model


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("variant", sorted(METHODS))
def test_save_adapter_loads_in_peft_with_the_same_outputs(arch, variant, tmp_path):
    make, targets, special = MODELS[arch]
    method, opts = METHODS[variant]
    base, ours = ours_with(make, targets, special, method, opts)
    lrcompile.save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] == (method == "dora")
    assert cfg["fan_in_fan_out"] == (arch == "gpt2")
    assert list(cfg["rank_pattern"].values()) == [2]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    x = ids()
    torch.testing.assert_close(out(pm, x), out(ours, x), atol=1e-5, rtol=1e-5)
    assert (out(base, x) - out(ours, x)).abs().max() > 1e-2  # the adapters do something


def test_save_adapter_vera_loads_in_peft(tmp_path):
    torch.manual_seed(0)
    base = llama()
    ours = copy.deepcopy(base)
    rule = {"match": ["q_proj", "down_proj"], "method": "vera", "rank": 4}
    lrcompile.rewrite(ours, {"defaults": {"min_features": 0}, "rules": [rule]}, (ids(),))
    perturb(ours)
    lrcompile.save_adapter(ours, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert pm.peft_config["default"].peft_type == "VERA"
    torch.testing.assert_close(out(pm, ids()), out(ours, ids()), atol=1e-5, rtol=1e-5)


def test_save_adapter_of_a_compiled_model(tmp_path):
    base, ours = ours_with(gpt2, ["c_attn"], "transformer.h.0.attn.c_attn", "lora", {})
    compiled = torch.compile(ours, backend="lrcompile", options={"inductor": False})
    x = ids()
    y = out(compiled, x)
    lrcompile.save_adapter(compiled, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(out(pm, x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "rules, message",
    [
        ([{"match": ["c_attn"], "method": "noble", "rank": 2}], "is noble: PEFT has no such adapter type"),
        (
            [{"match": ["c_attn"], "method": "lora", "rank": 2}, {"match": ["c_fc"], "method": "dora", "rank": 2}],
            "differ in kind",
        ),
        (
            [
                {"match": ["c_attn"], "method": "lora", "rank": 2, "dropout": 0.1},
                {"match": ["c_fc"], "method": "lora", "rank": 2},
            ],
            "differ in dropout",
        ),
        ([{"match": ["c_attn"], "method": "lora", "rank": 2, "init": "pissa"}], "initialised with pissa"),
        ([{"match": ["c_attn"], "method": "lowrank", "rank": 2}], "has no LoRA, DoRA or VeRA site"),
    ],
)
def test_save_adapter_refuses_what_peft_cannot_express(rules, message, tmp_path):
    model = gpt2()
    lrcompile.rewrite(model, {"defaults": {"min_features": 0}, "rules": rules}, (ids(),))
    with pytest.raises(lrcompile.PlanError, match=message) as e:
        lrcompile.save_adapter(model, tmp_path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "adapter_config.json").exists()


def peft_saved(base, peft_config, directory):
    """PEFT's own adapter with random non-zero weights, saved by PEFT; returns the PEFT model."""
    pm = peft.get_peft_model(copy.deepcopy(base), peft_config)
    perturb(pm)
    pm.save_pretrained(str(directory))
    return pm.eval()


PEFT_IN = {
    "gpt2-dora": (gpt2, dict(target_modules=["c_attn", "c_fc"], use_dora=True, fan_in_fan_out=True), DoRA),
    "llama-rslora": (llama, dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True), LoRA),
    "bert-lora": (bert, dict(target_modules=["query", "value", "dense"]), LoRA),
}


@pytest.mark.parametrize("case", sorted(PEFT_IN))
def test_load_adapter_from_peft_gives_peft_outputs(case, tmp_path):
    make, opts, family = PEFT_IN[case]
    torch.manual_seed(0)
    base = make()
    special = {"gpt2": "h.1.mlp.c_fc", "llama": "layers.1.self_attn.q_proj", "bert": "layer.1.attention.self.query"}
    arch = case.split("-")[0]
    alpha_key = r"h\.0\.attn\.c_attn" if arch == "gpt2" else "v.*"
    cfg = peft.LoraConfig(r=4, lora_alpha=8, rank_pattern={special[arch]: 2}, alpha_pattern={alpha_key: 5}, **opts)
    pm = peft_saved(base, cfg, tmp_path)
    inputs = (ids(),) if arch == "llama" else None  # traced sites, or modules by name as PEFT finds them
    ours = lrcompile.load_adapter(copy.deepcopy(base), tmp_path, inputs)
    installed = {p: m for p, m in ours.named_modules() if isinstance(m, (LoRA, DoRA, VeRA))}
    peft_sites = {p.removeprefix("base_model.model.") for p, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert set(installed) == peft_sites and all(type(m) is family for m in installed.values())
    assert installed[next(p for p in installed if p.endswith(special[arch]))].lora_A.shape[0] == 2  # rank_pattern
    assert 5 / (2 if "rslora" in case else 4) in {float(m.scaling) for m in installed.values()}  # alpha_pattern
    x = ids()
    torch.testing.assert_close(out(ours, x), out(pm, x), atol=1e-5, rtol=1e-5)
    assert (out(base, x) - out(ours, x)).abs().max() > 1e-2


def test_load_adapter_vera_from_peft(tmp_path):
    torch.manual_seed(0)
    base = llama()
    pm = peft_saved(base, peft.VeraConfig(r=4, target_modules=["q_proj", "down_proj"]), tmp_path)
    ours = lrcompile.load_adapter(copy.deepcopy(base), tmp_path, (ids(),))
    assert sum(isinstance(m, VeRA) for m in ours.modules()) == 4
    torch.testing.assert_close(out(ours, ids()), out(pm, ids()), atol=1e-5, rtol=1e-5)


def test_peft_adapter_round_trips_through_our_compile_path_and_back(tmp_path):
    """PEFT -> load_adapter -> torch.compile(backend='lrcompile') -> save_adapter -> PEFT: the same outputs."""
    torch.manual_seed(0)
    base = gpt2()
    pm = peft_saved(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True), tmp_path / "a"
    )
    ours = lrcompile.load_adapter(copy.deepcopy(base), tmp_path / "a", (ids(),))
    compiled = torch.compile(ours, backend="lrcompile", options={"inductor": False})
    x = ids()
    torch.testing.assert_close(out(compiled, x), out(pm, x), atol=1e-5, rtol=1e-5)
    lrcompile.save_adapter(compiled, tmp_path / "b")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "b")).eval()
    torch.testing.assert_close(out(again, x), out(pm, x), atol=1e-5, rtol=1e-5)


def _edit(directory, config=None, tensors=None):
    from safetensors.torch import load_file, save_file

    if config is not None:
        c = json.loads((directory / "adapter_config.json").read_text())
        c.update(config)
        (directory / "adapter_config.json").write_text(json.dumps(c))
    if tensors is not None:
        sd = load_file(str(directory / "adapter_model.safetensors"))
        save_file(tensors(sd), str(directory / "adapter_model.safetensors"))


def _rename_first(sd):
    k = sorted(sd)[0]
    sd[k.replace("c_attn", "c_proj")] = sd.pop(k)
    return sd


def _reshape_first(sd):
    k = sorted(sd)[0]
    sd[k] = torch.zeros(sd[k].shape[0] + 1, sd[k].shape[1])
    return sd


@pytest.mark.parametrize(
    "config, tensors, message",
    [
        ({"bias": "all"}, None, "adapter_config.json: bias: 'all'"),
        ({"modules_to_save": ["lm_head"]}, None, "adapter_config.json: modules_to_save: set to"),
        ({"target_parameters": ["mlp.c_fc.weight"]}, None, "adapter_config.json: target_parameters: set to"),
        ({"peft_type": "IA3"}, None, "adapter_config.json: peft_type: 'IA3' has no lrcompile adapter"),
        ({"r": "4"}, None, "adapter_config.json: r: method 'lora': rank must be an int"),
        ({"rank_pattern": {"(a+)+": 2}}, None, "adapter_config.json: rank_pattern: regex"),
        ({"target_modules": ["wte"]}, None, "targets 'transformer.wte' (Embedding)"),
        (None, _rename_first, "is no tensor of an adapter the config installs"),
        (None, _reshape_first, "has shape (5, 32), the config and model give (4, 32)"),
        (None, lambda sd: {k: v for k, v in sorted(sd.items())[1:]}, "missing (1 missing)"),
        (None, lambda sd: {k: v.to(torch.int32) for k, v in sd.items()}, "has dtype I32"),
    ],
)
def test_load_adapter_checks_the_directory_before_touching_the_model(config, tensors, message, tmp_path):
    torch.manual_seed(0)
    base = gpt2()
    peft_saved(base, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True), tmp_path)
    _edit(tmp_path, config, tensors)
    model = copy.deepcopy(base)
    with pytest.raises((lrcompile.PlanError, lrcompile.PolicyError), match=re.escape(message)) as e:
        lrcompile.load_adapter(model, tmp_path)
    assert "\n" not in str(e.value)
    assert not any(isinstance(m, (LoRA, DoRA)) for m in model.modules())


def test_load_adapter_rejects_a_file_that_is_not_json_or_safetensors(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(lrcompile.PlanError, match="adapter_config.json: not valid JSON"):
        lrcompile.load_adapter(gpt2(), tmp_path, (ids(),))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["c_attn"]}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(lrcompile.PlanError, match="adapter_model.safetensors: not a readable safetensors file"):
        lrcompile.load_adapter(gpt2(), tmp_path, (ids(),))
