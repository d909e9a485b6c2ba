"""The example policies shipped in the package: each loads, `check --examples` lists it, and each rewrites the HF
architectures its comment names into the methods it promises (min_features lowered for the tiny widths)."""

import json

import pytest
import torch
from conftest import hf_output, tiny_hf

import lrcompile
from lrcompile.cli import main
from lrcompile.policy import examples

pytest.importorskip("transformers")

# example -> (models it names, the methods its rewritten linear sites must use)
PROMISES = {
    "compress-50": (("bert", "gpt2", "llama"), {"lowrank"}),
    "compress-75": (("bert", "gpt2", "llama"), {"lowrank"}),
    "lora-attention": (("bert", "gpt2", "llama"), {"lora"}),
    "dora-all-linear": (("bert", "gpt2", "llama"), {"dora"}),
    "monarch-mlp": (("bert", "gpt2", "llama"), {"monarch"}),
    "minilm-whitened": (("bert",), {"lowrank"}),
}
OTHERS = {"demo", "attn-shared-kv"}  # tested with the demo model and in test_attention.py


def test_every_shipped_example_is_covered_and_loads():
    assert set(examples.names()) == set(PROMISES) | OTHERS
    for name in examples.names():
        assert lrcompile.load_policy(examples.path(name)).rules
        assert examples.summary(name)


def test_check_lists_and_takes_examples_by_name(capsys):
    assert main(["check", "--examples"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in examples.names())
    assert main(["check", "lora-attention"]) == 0
    assert "lora-attention.yaml: valid" in capsys.readouterr().out
    assert main(["check", "no-such-example"]) == 2
    err = capsys.readouterr().err
    assert "no policy file or example named 'no-such-example'" in err and err.count("\n") == 1


@pytest.mark.parametrize("name", sorted(PROMISES))
def test_example_rewrites_the_models_it_names(name, tmp_path):
    models, methods = PROMISES[name]
    for kind in models:
        torch.manual_seed(0)
        model, inputs = tiny_hf(kind, width=48, inter=96, layers=2, heads=4, kv_heads=2, vocab=120, tokens=9)
        pol = lrcompile.load_policy(examples.path(name))
        pol.defaults.min_features = 0
        with torch.no_grad():
            ref = hf_output(model(**inputs))
        with pytest.warns(UserWarning) if name == "minilm-whitened" else _nothing():  # no statistics: svd
            lrcompile.rewrite(model, pol, inputs, report=str(tmp_path / f"{kind}.json"))
        rows = json.loads((tmp_path / f"{kind}.json").read_text())["sites"]
        done = {r["method"] for r in rows if r["status"] == "rewritten"}
        assert done == methods, (name, kind, done)
        with torch.no_grad():
            out = hf_output(model(**inputs))
        assert torch.isfinite(out).all() and out.shape == ref.shape
        if methods & {"lora", "dora"}:  # adapters start as the identity
            assert torch.allclose(out, ref, atol=1e-4), (name, kind)
            frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
            assert frozen and any(p.requires_grad for p in model.parameters())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
