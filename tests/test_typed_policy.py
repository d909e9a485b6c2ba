"""Typed configs (lrcompile.LoRA(rank=16), ...) as a policy, and a PEFT LoraConfig as a policy."""

import copy
import json
import re

import pytest
import torch
from conftest import compile_eager
from torch import nn

import lrcompile
from lrcompile.families.adapters.dora import DoRA
from lrcompile.families.adapters.lora import LoRA
from lrcompile.families.monarch import Monarch


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.attn = nn.ModuleDict({"q": nn.Linear(d, d), "v": nn.Linear(d, d)})
        self.mlp = nn.ModuleDict({"up": nn.Linear(d, 2 * d), "down": nn.Linear(2 * d, d)})

    def forward(self, x):
        x = x + self.attn["v"](torch.tanh(self.attn["q"](x)))
        return x + self.mlp["down"](torch.relu(self.mlp["up"](x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def model_and_input():
    torch.manual_seed(0)
    return Net(), torch.randn(3, 5, 32)


TYPED = {
    "defaults": {"min_features": 0},
    "*.mlp.*": lrcompile.Monarch(blocks=4),
    "re:.*attn.*": lrcompile.LoRA(rank=4, alpha=8),
}
YAML = {
    "defaults": {"min_features": 0},
    "rules": [
        {"match": "*.mlp.*", "method": "monarch", "blocks": 4},
        {"match": "re:.*attn.*", "method": "lora", "rank": 4, "alpha": 8},
    ],
}


def types(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (LoRA, Monarch))}


def test_typed_policy_is_the_yaml_policy():
    net, x = model_and_input()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    torch.manual_seed(1)
    lrcompile.rewrite(a, TYPED, (x,))
    torch.manual_seed(1)
    lrcompile.rewrite(b, YAML, (x,))
    assert types(a) == types(b) and len(types(a)) == 8
    assert set(types(a).values()) == {"LoRA", "Monarch"}
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    # the caller's config objects are not bound or changed by a policy
    assert TYPED["re:.*attn.*"] == lrcompile.LoRA(rank=4, alpha=8)


def test_typed_policy_as_backend_option(tmp_path):
    net, x = model_and_input()
    torch.manual_seed(1)
    eager = lrcompile.rewrite(copy.deepcopy(net), TYPED, (x,))
    torch.manual_seed(1)
    compiled = compile_eager(copy.deepcopy(net), policy=TYPED, report=str(tmp_path / "r.json"))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)
    sites = json.loads((tmp_path / "r.json").read_text())["sites"]
    assert (
        sorted((s["method"], s["status"]) for s in sites)
        == [("lora", "rewritten")] * 4 + [("monarch", "rewritten")] * 4
    )


def test_attention_config_makes_an_attention_rule():
    pol = lrcompile.load_policy({"re:.*attn.*": lrcompile.SDPA(), "lm_head": "dense"})
    assert [(r.kind, r.method) for r in pol.rules] == [("attention", "sdpa"), ("linear", "dense")]


def yaml_message(rule: dict) -> str:
    with pytest.raises(lrcompile.PolicyError) as e:
        lrcompile.load_policy({"rules": [rule]})
    return str(e.value).split(": ", 2)[2]  # without '<policy>: rule 1 (match ...)'


@pytest.mark.parametrize(
    "config, rule",
    [
        (lrcompile.LoRA(rank=0), {"method": "lora", "rank": 0}),
        (lrcompile.LoRA(rank=4, dropout=1.5), {"method": "lora", "rank": 4, "dropout": 1.5}),
        (lrcompile.LowRank(), {"method": "lowrank"}),
        (lrcompile.Monarch(blocks="x"), {"method": "monarch", "blocks": "x"}),
    ],
)
def test_typed_errors_are_yamls_and_name_the_rule(config, rule):
    with pytest.raises(lrcompile.PolicyError) as e:
        lrcompile.load_policy({"*.mlp.*": config})
    msg = str(e.value)
    assert msg.startswith("<policy>: rule 1 (match '*.mlp.*'): ") and "\n" not in msg
    assert msg.split(": ", 2)[2] == yaml_message({"match": "*.mlp.*", **rule})


def test_without_example_inputs_attention_rules_are_refused():
    net, _ = model_and_input()
    with pytest.raises(lrcompile.PolicyError, match="<policy>: attention rules need example_inputs"):
        lrcompile.rewrite(net, {"re:.*attn.*": lrcompile.SDPA()})


def test_typed_mapping_rejects_what_is_no_config():
    from lrcompile.families.adapters.lora import LoRAConfig

    with pytest.raises(lrcompile.PolicyError, match=re.escape("rule 2 (match 'b'): expected a config object")):
        lrcompile.load_policy({"a": lrcompile.LoRA(), "b": 3})
    with pytest.raises(lrcompile.PolicyError, match="is the config of lora and dora: use lrcompile.LoRA"):
        lrcompile.load_policy({"a": LoRAConfig()})
    with pytest.raises(lrcompile.PolicyError, match="rule 1 \\(match 're:\\(a\\+\\)\\+'\\): regex"):
        lrcompile.load_policy({"re:(a+)+": lrcompile.LoRA()})


peft = pytest.importorskip("peft")


def copy_peft_weights(pm, ours):
    """PEFT's A / B (and DoRA magnitudes) into our installed modules, by module path."""
    with torch.no_grad():
        for path, m in ours.named_modules():
            if isinstance(m, (LoRA, DoRA)):
                layer = pm.get_submodule(f"base_model.model.{path}")
                m.lora_A.copy_(layer.lora_A["default"].weight)
                m.lora_B.copy_(layer.lora_B["default"].weight)
                if isinstance(m, DoRA):
                    m.magnitude.copy_(layer.lora_magnitude_vector["default"].weight)


@pytest.mark.parametrize(
    "opts",
    [
        dict(target_modules=["q", "v", "blocks.1.mlp.up"]),
        dict(
            target_modules=r".*\.(q|up)", use_rslora=True, rank_pattern={"blocks.1.attn.q": 2}, alpha_pattern={"up": 3}
        ),
        dict(target_modules=["q", "v"], use_dora=True, exclude_modules=["blocks.0.attn.v"]),
    ],
)
def test_lora_config_is_a_policy_in_step_with_peft(opts):
    net, x = model_and_input()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, **opts)
    pm = peft.get_peft_model(copy.deepcopy(net), cfg)
    inputs = (x,) if cfg.use_dora else None  # None: modules found by name, as PEFT finds them
    ours = lrcompile.rewrite(copy.deepcopy(net), cfg, inputs)
    peft_sites = {p.removeprefix("base_model.model.") for p, m in pm.named_modules() if hasattr(m, "lora_A")}
    mine = {p: m for p, m in ours.named_modules() if isinstance(m, (LoRA, DoRA))}
    assert set(mine) == peft_sites
    assert all(type(m) is (DoRA if cfg.use_dora else LoRA) for m in mine.values())
    for p, m in mine.items():  # rank and scaling per module as PEFT's
        layer = pm.get_submodule(f"base_model.model.{p}")
        assert m.lora_A.shape == layer.lora_A["default"].weight.shape
        assert float(m.scaling) == pytest.approx(layer.scaling["default"])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), net(x))  # B = 0: the base model's outputs
    # train both one step from the same weights: the same outputs and gradients
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    copy_peft_weights(pm, ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), pm(x), atol=1e-5, rtol=1e-5)
    trained = [p for p in ours.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trained) == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    for model, params in ((ours, trained), (pm, [p for p in pm.parameters() if p.requires_grad])):
        opt = torch.optim.SGD(params, lr=0.1)
        model(x).square().mean().backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), pm(x), atol=1e-5, rtol=1e-5)


def test_lora_config_as_backend_option():
    net, x = model_and_input()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(net), cfg)
    compiled = compile_eager(copy.deepcopy(net), policy=cfg)
    y = compiled(x)
    mine = {p: m for p, m in compiled._orig_mod.named_modules() if isinstance(m, LoRA)}
    assert sorted(mine) == ["blocks.0.attn.q.lrcompile", "blocks.1.attn.q.lrcompile"]  # attached beside the site
    assert (y - net(x)).abs().max() > 1e-2  # init_lora_weights=False: B is drawn, the branch is not silent
    with torch.no_grad():  # PEFT's weights into ours, in place: the compiled graph reads them as inputs
        for p, m in mine.items():
            layer = pm.get_submodule(f"base_model.model.{p.removesuffix('.lrcompile')}")
            m.lora_A.copy_(layer.lora_A["default"].weight)
            m.lora_B.copy_(layer.lora_B["default"].weight)
        torch.testing.assert_close(compiled(x), pm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "opts, message",
    [
        (dict(target_modules=["q"], target_parameters=["mlp.up.weight"]), "LoraConfig: target_parameters: set to"),
        (dict(target_modules=["q"], layers_to_transform=[0]), "LoraConfig: layers_to_transform: set to [0]"),
        (dict(target_modules=["q"], modules_to_save=["v"]), "LoraConfig: modules_to_save: set to"),
        (dict(target_modules=["q"], bias="all"), "LoraConfig: bias: 'all'"),
        (dict(target_modules=["q"], init_lora_weights="olora"), "LoraConfig: init_lora_weights: 'olora'"),
        (dict(target_modules=["q"], use_qalora=True), "LoraConfig: use_qalora: set to True"),
        (dict(target_modules="all-linear"), "LoraConfig: target_modules: 'all-linear'"),
        (dict(), "LoraConfig: target_modules: not set"),
    ],
)
def test_lora_config_fields_that_do_not_map_are_one_line_errors(opts, message):
    net, x = model_and_input()
    with pytest.raises(lrcompile.PolicyError, match=re.escape(message)) as e:
        lrcompile.rewrite(net, peft.LoraConfig(**opts), (x,))
    assert "\n" not in str(e.value)
