"""MoE experts (transformers 5's 3-D expert weights) as per-expert sites: compression, LoRA, PEFT parity."""

import copy

import pytest
import torch

import lrcompile
from lrcompile.errors import PolicyError
from lrcompile.experts import ExpertBank

transformers = pytest.importorskip("transformers")

E, H, INTER = 4, 32, 48
PROJ = ("gate_up_proj", "down_proj")


pytestmark = pytest.mark.usefixtures("one_thread")


def mixtral():
    cfg = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=H,
        intermediate_size=INTER,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=E,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return transformers.MixtralForCausalLM(cfg).eval()


def qwen2_moe():
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=64,
        hidden_size=H,
        intermediate_size=INTER,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=INTER,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=E,
        num_experts_per_tok=2,
    )
    return transformers.Qwen2MoeForCausalLM(cfg).eval()


def policy(method, match="*.experts.*", **opts):
    return {"version": 1, "defaults": {"min_features": 1}, "rules": [{"match": match, "method": method, **opts}]}


def ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def banks(model):
    return [m for m in model.modules() if isinstance(m, ExpertBank)]


def expert_rows(model, status="rewritten"):
    return {r.fqn for r in model.lrcompile_report.sites() if ".experts." in r.fqn and r.status == status}


def all_expert_names(n_layers=2):
    return {f"model.layers.{i}.mlp.experts.{p}.{e}" for i in range(n_layers) for p in PROJ for e in range(E)}


@pytest.mark.parametrize("build", [mixtral, qwen2_moe])
def test_full_rank_reproduces_dense_and_report_lists_every_expert(build):
    model = build()
    x = ids()
    ref = logits(model, x)
    lrcompile.rewrite(model, policy("lowrank", rank=H), (x,))
    assert len(banks(model)) == 2
    assert expert_rows(model) == all_expert_names()
    keys = model.state_dict().keys()
    assert not any(k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj") for k in keys)
    assert "model.layers.0.mlp.experts.gate_up_proj_U" in keys
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5)


def test_rank_r_matches_float64_svd_of_each_expert():
    model = mixtral()
    x = ids()
    dense = copy.deepcopy(model)
    r = 5
    lrcompile.rewrite(model, policy("lowrank", rank=r), (x,))
    for i, layer in enumerate(dense.model.layers):
        bank = model.model.layers[i].mlp.experts
        assert isinstance(bank, ExpertBank) and bank.plans["gate_up_proj"].cfg.rank == r
        for p in PROJ:
            w3 = getattr(layer.mlp.experts, p)
            ref = []
            for e in range(E):
                P, S, Qh = torch.linalg.svd(w3[e].detach().double(), full_matrices=False)
                ref.append((P[:, :r] * S[:r]) @ Qh[:r])
                got = bank.expert_weight(p, e).double()
                torch.testing.assert_close(got, ref[-1], rtol=1e-5, atol=1e-5)
            with torch.no_grad():  # the dense reference model runs the rank-r matrices through HF's own forward
                w3.copy_(torch.stack(ref).to(w3.dtype))
    torch.testing.assert_close(logits(model, x), logits(dense, x), rtol=1e-5, atol=1e-5)


def test_lora_per_expert_trains_only_the_branches():
    model = mixtral()
    x = ids()
    ref = logits(model, x)
    lrcompile.rewrite(model, policy("lora", rank=4, alpha=8), (x,))
    assert expert_rows(model) == all_expert_names()
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-6, atol=1e-6)  # B = 0 at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.mlp.experts.{p}_lora_{ab}" for i in range(2) for p in PROJ for ab in "AB"}
    bank = model.model.layers[0].mlp.experts
    assert bank.gate_up_proj_lora_A.shape == (E, 4, H) and bank.gate_up_proj_lora_B.shape == (E, 2 * INTER, 4)
    assert not bank.gate_up_proj.requires_grad
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x, labels=x).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    routed = torch.unique(model.model.layers[0].mlp.gate(model.model.embed_tokens(x).reshape(-1, H))[2])
    grads_b = bank.gate_up_proj_lora_B.grad.flatten(1).abs().sum(1)
    assert (grads_b[routed] > 0).all()  # each routed expert's own B gets its gradient
    opt.step()
    model.eval()
    assert (logits(model, x) - ref).abs().max() > 1e-4


def test_lora_per_expert_equals_peft_target_parameters():
    peft = pytest.importorskip("peft")
    model = mixtral()
    base = copy.deepcopy(model)
    x = ids()
    r = 4
    plain = logits(base, x)
    lrcompile.rewrite(model, policy("lora", rank=r, alpha=8), (x,))
    pm = peft.get_peft_model(
        base,
        peft.LoraConfig(r=r, lora_alpha=8, target_modules=[], target_parameters=[f"experts.{p}" for p in PROJ]),
    )
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = [(n, m) for n, m in pm.named_modules() if isinstance(m, ParamWrapper)]
    assert len(wrappers) == 4
    with torch.no_grad():
        for n, m in wrappers:
            layer = int(n.split("layers.")[1].split(".")[0])
            bank = model.model.layers[layer].mlp.experts
            A, B = getattr(bank, f"{m.parameter_name}_lora_A"), getattr(bank, f"{m.parameter_name}_lora_B")
            B.normal_()  # a non-zero branch on both sides
            A.normal_()
            out_f = B.shape[1]
            # PEFT: lora_A (E·r, in) = A[e] stacked; lora_B (out, r·E) with expert as the fastest axis
            m.lora_A["default"].weight.copy_(A.reshape(E * r, -1))
            m.lora_B["default"].weight.copy_(B.permute(1, 2, 0).reshape(out_f, r * E))
    want, got = logits(pm, x), logits(model, x)
    assert (want - plain).abs().max() > 1e-3  # the branches matter
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_expert_addressed_alone():
    model = mixtral()
    x = ids()
    lrcompile.rewrite(model, policy("lora", match="model.layers.0.mlp.experts.gate_up_proj.1", rank=2), (x,))
    (bank,) = banks(model)
    assert bank.plans["gate_up_proj"].experts == (1,) and "down_proj" not in bank.plans
    assert expert_rows(model) == {"model.layers.0.mlp.experts.gate_up_proj.1"}
    assert "model.layers.0.mlp.experts.gate_up_proj.0" in expert_rows(model, "dense")
    assert bank.gate_up_proj_lora_A.shape == (1, 2, H)


def test_parameter_path_addresses_all_its_experts():
    model = mixtral()
    x = ids()
    lrcompile.rewrite(model, policy("lowrank", match="*.experts.down_proj", rank=3), (x,))
    assert expert_rows(model) == {n for n in all_expert_names() if ".down_proj." in n}
    assert all("gate_up_proj" not in b.plans for b in banks(model))


def test_compressing_a_subset_of_experts_is_refused():
    model = mixtral()
    with pytest.raises(PolicyError, match="every expert of the parameter or none"):
        lrcompile.rewrite(model, policy("lowrank", match="*.gate_up_proj.2", rank=3), (ids(),))


def test_lora_dropout_on_experts_is_refused():
    with pytest.raises(PolicyError, match="dropout is not supported on expert sites"):
        lrcompile.rewrite(mixtral(), policy("lora", rank=2, dropout=0.1), (ids(),))


def test_compiled_bank_matches_eager():
    model = mixtral()
    x = ids()
    lrcompile.rewrite(model, policy("lora", rank=4), (x,))
    assert len(banks(model)) == 2
    with torch.no_grad():
        for b in banks(model):
            b.gate_up_proj_lora_B.normal_()
    want = logits(model, x)
    compiled = torch.compile(model, backend="lrcompile", options={"inductor": False})
    torch.testing.assert_close(logits(compiled, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,opts", [("lora", {"rank": 3}), ("lowrank", {"rank": 5})])
def test_save_load_reproduces_the_bank(tmp_path, method, opts):
    model = mixtral()
    x = ids()
    lrcompile.rewrite(model, policy(method, **opts), (x,))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".experts." in n and p.requires_grad:
                p.add_(torch.randn_like(p))  # trained factors
    want = logits(model, x)
    lrcompile.save(model, str(tmp_path))
    fresh = mixtral()
    lrcompile.load(fresh, str(tmp_path))
    assert len(banks(fresh)) == 2
    torch.testing.assert_close(logits(fresh, x), want, rtol=0, atol=0)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_load_refuses_a_bad_experts_entry(tmp_path):
    import json

    model = mixtral()
    lrcompile.rewrite(model, policy("lora", rank=3), (ids(),))
    lrcompile.save(model, str(tmp_path))
    plan = json.loads((tmp_path / "plan.json").read_text())
    entry = next(e for e in plan["sites"] if e.get("family") == "experts")
    entry["projections"]["down_proj"]["experts"] = [0, 9]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    fresh = mixtral()
    before = {n: p.clone() for n, p in fresh.state_dict().items()}
    with pytest.raises(lrcompile.errors.PlanError, match="experts must be distinct indices below 4"):
        lrcompile.load(fresh, str(tmp_path))
    assert not banks(fresh) and fresh.state_dict().keys() == before.keys()  # a refused load leaves it as it was


def test_merge_folds_expert_lora_into_the_3d_weights():
    model = mixtral()
    x = ids()
    lrcompile.rewrite(model, policy("lora", rank=3), (x,))
    assert len(banks(model)) == 2
    with torch.no_grad():
        for b in banks(model):
            b.down_proj_lora_B.normal_()
    want = logits(model, x)
    lrcompile.merge(model)
    assert not banks(model)
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert model.model.layers[0].mlp.experts.down_proj.shape == (E, H, INTER)
    torch.testing.assert_close(logits(model, x), want, rtol=1e-5, atol=1e-5)


def test_backend_policy_says_experts_need_rewrite():
    model = mixtral()
    compiled = torch.compile(model, backend="lrcompile", options={"policy": policy("lora", rank=2), "inductor": False})
    with pytest.warns(UserWarning, match="mlp.experts: MoE experts and nn.MultiheadAttention are sites of lrcompile"):
        logits(compiled, ids())
    assert not banks(model)


def test_adapter_state_dict_carries_expert_lora_and_hot_swaps():
    x = ids()
    a, b = mixtral(), mixtral()
    b.load_state_dict(a.state_dict())
    lrcompile.rewrite(a, policy("lora", rank=4), (x,))
    lrcompile.rewrite(b, policy("lora", rank=4), (x,))
    with torch.no_grad():
        for bank in banks(a):
            bank.gate_up_proj_lora_B.normal_()
    sd = lrcompile.adapter_state_dict(a)
    assert {k for k in sd if ".experts." in k} == {
        f"model.layers.{i}.mlp.experts.{p}_{t}" for i in range(2) for p in PROJ for t in ("lora_A", "lora_B", "scaling")
    }
    assert (logits(a, x) - logits(b, x)).abs().max() > 1e-3
    lrcompile.load_adapter_state_dict(b, sd)
    torch.testing.assert_close(logits(b, x), logits(a, x), rtol=0, atol=0)


def test_mixtral_compresses_then_lora_trains_its_experts():
    """The issue's bar: the experts compressed by one rewrite, LoRA on the others by a second; training lowers the
    loss and touches only the LoRA tensors."""
    model = mixtral()
    x = ids()
    lrcompile.rewrite(model, policy("lowrank", match="*.experts.gate_up_proj", rank=8), (x,))
    u_before = model.model.layers[0].mlp.experts.gate_up_proj_U.detach().clone()
    lrcompile.rewrite(model, policy("lora", match="*.experts.down_proj", rank=4, alpha=8), (x,))
    assert expert_rows(model) == {n for n in all_expert_names() if ".down_proj." in n}
    for b in banks(model):
        assert {p: pl.family.name for p, pl in b.plans.items()} == {"gate_up_proj": "lowrank", "down_proj": "lora"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.mlp.experts.down_proj_lora_{ab}" for i in range(2) for ab in "AB"}
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3
    torch.testing.assert_close(model.model.layers[0].mlp.experts.gate_up_proj_U, u_before, rtol=0, atol=0)


def test_an_expert_over_max_error_keeps_its_parameter_dense():
    model = mixtral()
    x = ids()
    ref = logits(model, x)
    pol = policy("lowrank", match="*.experts.*", rank=2)
    strict = {"match": "model.layers.0.mlp.experts.down_proj.1", "method": "lowrank", "rank": 2, "max_error": 0.01}
    pol["rules"].insert(0, strict)
    with pytest.warns(UserWarning, match="model.layers.0.mlp.experts.down_proj: 1 of its experts stay dense"):
        lrcompile.rewrite(model, pol, (x,))
    b0 = model.model.layers[0].mlp.experts
    assert set(b0.plans) == {"gate_up_proj"} and b0.down_proj.shape == (E, H, INTER)
    assert "model.layers.0.mlp.experts.down_proj.0" in expert_rows(model, "skipped")
    assert set(model.model.layers[1].mlp.experts.plans) == {"gate_up_proj", "down_proj"}
    assert (logits(model, x) - ref).abs().max() > 1e-4


def test_a_refused_policy_changes_no_experts_module():
    model = mixtral()
    pol = policy("lora", match="*.experts.*", rank=2)
    pol["rules"].insert(0, {"match": "model.layers.1.mlp.experts.down_proj.0", "method": "lora", "rank": 4})
    with pytest.raises(PolicyError, match="one method and configuration"):
        lrcompile.rewrite(model, pol, (ids(),))
    assert not banks(model)


def test_save_adapter_refuses_expert_lora_in_one_line(tmp_path):
    model = mixtral()
    lrcompile.rewrite(model, policy("lora", rank=2), (ids(),))
    with pytest.raises(lrcompile.errors.PlanError, match="LoRA on MoE experts .* is not written in PEFT's format"):
        lrcompile.save_adapter(model, str(tmp_path))
