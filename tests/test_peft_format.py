"""PEFT's adapter format in and out (lrcompile.save_adapter / load_adapter), checked against PEFT itself on HF
models built from small configs."""

import copy
import json

import pytest
import torch

import lrcompile

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
