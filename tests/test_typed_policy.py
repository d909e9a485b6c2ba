"""Typed configs (lrcompile.LoRA(rank=16), ...) as a policy, and a PEFT LoraConfig as a policy."""

import copy
import json
import re

import pytest
import torch
from conftest import compile_eager
from torch import nn

import lrcompile
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


def test_typed_mapping_rejects_what_is_no_config():
    from lrcompile.families.adapters.lora import LoRAConfig

    with pytest.raises(lrcompile.PolicyError, match=re.escape("rule 2 (match 'b'): expected a config object")):
        lrcompile.load_policy({"a": lrcompile.LoRA(), "b": 3})
    with pytest.raises(lrcompile.PolicyError, match="is the config of lora and dora: use lrcompile.LoRA"):
        lrcompile.load_policy({"a": LoRAConfig()})
    with pytest.raises(lrcompile.PolicyError, match="rule 1 \\(match 're:\\(a\\+\\)\\+'\\): regex"):
        lrcompile.load_policy({"re:(a+)+": lrcompile.LoRA()})
