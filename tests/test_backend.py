"""The backend end to end (without Inductor unless marked slow): numbers, parameters, training, report,
failures, stale factors."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import all_lowrank, compile_eager, lowered
from torch import nn

import lrcompile
from lrcompile.families.lowrank import LowRank, LowRankConfig


def test_full_rank_reproduces(toy):
    m, ids = toy
    ref = m(ids)
    out = compile_eager(m, all_lowrank(10_000))(ids)
    assert ((out - ref).norm() / ref.norm()) < 1e-5
    assert len(lowered(m)) == 7 and set(lowered(m).values()) == {"rewritten"}  # the factors ran, not the dense


def test_half_rank_error_matches_report(tmp_path):
    lin = nn.Linear(96, 80)
    x = torch.randn(4000, 96)  # isotropic inputs: output error ≈ weight error
    ref = lin(x) - lin.bias
    report = tmp_path / "r.json"
    out = compile_eager(lin, all_lowrank(0.5), report=str(report))(x) - lin.bias
    row = json.loads(report.read_text())["sites"][0]
    measured = ((out - ref).norm() / ref.norm()).item()
    assert row["status"] == "rewritten" and row["rank"] == 21
    assert 0.05 < row["rel_error"] < 1
    assert measured == pytest.approx(row["rel_error"], rel=0.05)


def test_factors_are_parameters_of_the_model_and_train(toy):
    m, ids = toy
    c = compile_eager(m, all_lowrank(6))
    c(ids)
    names = dict(m.named_parameters())
    for n in [
        "blocks.0.fc.lrcompile.U",
        "blocks.0.lrcompile_w.V",
        "heads.shared.lrcompile.U",
        "lrcompile_v.U",
        "lm_head.lrcompile.V",
    ]:
        assert n in names and n in m.state_dict()
    assert m.heads.shared.lrcompile.U.shape == (24, 6)  # called twice, one set of factors
    # the head's factors are its own: the embedding is untouched
    assert m.lm_head.lrcompile.U.shape == (30, 6)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    target = torch.randn(3, 7, 30)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = (c(ids) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert m.blocks[0].fc.lrcompile.U.grad is not None
    assert m.blocks[0].fc.weight.grad is None  # the dense weight of a rewritten site is not used


def test_no_recompile_while_training(toy):
    from lrcompile.backend import lrcompile_backend

    m, ids = toy
    calls = []
    opts = {"policy": all_lowrank(4), "inductor": False}

    def counting(gm, inputs):
        calls.append(1)
        return lrcompile_backend(gm, inputs, options=opts)

    c = torch.compile(m, backend=counting)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    for _ in range(4):
        opt.zero_grad()
        c(ids).sum().backward()
        opt.step()
    assert len(calls) == 1
    assert set(lowered(m).values()) == {"rewritten"}  # that one call rewrote the graph


def test_graph_breaks_share_one_report(tmp_path):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    m = Broken()
    x = torch.randn(3, 16)
    ref = m(x)
    rep = tmp_path / "r.json"
    out = compile_eager(m, all_lowrank(16), report=str(rep))(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert [s["fqn"] for s in json.loads(rep.read_text())["sites"]] == ["a", "b"]


def test_report_schema_and_table(toy, tmp_path, capsys):
    m, ids = toy
    pol = {
        "defaults": {"min_features": 20},
        "rules": [{"match": "lm_head", "method": "dense"}, {"match": "*", "method": "lowrank", "rank": 4}],
    }
    rep = tmp_path / "sub" / "report.json"
    compile_eager(m, pol, report=str(rep), verbose=True)(ids)
    data = json.loads(rep.read_text())
    rows = {s["fqn"]: s for s in data["sites"]}
    for key in (
        "fqn",
        "kind",
        "method",
        "status",
        "rank",
        "params_before",
        "params_after",
        "flops_before",
        "flops_after",
        "rel_error",
    ):
        assert key in rows["blocks.0.fc"], key
    assert rows["blocks.0.fc"]["params_before"] == 24 * 40 + 40
    assert rows["blocks.0.fc"]["params_after"] == 4 * (24 + 40) + 40
    assert rows["blocks.0.fc"]["flops_after"] == 2 * 4 * (24 + 40)
    assert rows["lm_head"]["status"] == "dense"
    assert rows["v"]["status"] == "rewritten"
    out = capsys.readouterr().out
    assert "blocks.0.fc" in out and "rewritten" in out


def test_min_features_skips_and_max_error_keeps_dense(toy, tmp_path):
    m, ids = toy
    ref = m(ids)
    rep = tmp_path / "r.json"
    pol = {
        "defaults": {"min_features": 0, "max_error": 0.3},
        "rules": [
            {"match": "blocks.*.fc", "method": "lowrank", "rank": 2, "min_features": 25},
            {"match": "*", "method": "lowrank", "rank": 2},
        ],
    }
    with pytest.warns(UserWarning, match="max_error"):
        out = compile_eager(m, pol, report=str(rep))(ids)
    rows = {s["fqn"]: s for s in json.loads(rep.read_text())["sites"]}
    assert rows["blocks.0.fc"]["status"] == "skipped" and "min_features" in rows["blocks.0.fc"]["reason"]
    assert rows["lm_head"]["status"] == "skipped" and "max_error" in rows["lm_head"]["reason"]
    torch.testing.assert_close(out, ref)  # nothing was rewritten


def inner(exc: BaseException) -> BaseException:
    """The exception the backend raised, out of Dynamo's multi-line BackendCompilerFailed."""
    while isinstance(exc, torch._dynamo.exc.BackendCompilerFailed) or type(exc).__module__.startswith("torch._dynamo"):
        nxt = getattr(exc, "inner_exception", None) or exc.__cause__
        if nxt is None:
            break
        exc = nxt
    return exc


def test_strict_raises_one_line(toy):
    m, ids = toy
    pol = {
        "defaults": {"min_features": 0, "max_error": 0.01, "strict": True},
        "rules": [{"match": "*", "method": "lowrank", "rank": 1}],
    }
    with pytest.raises(Exception) as e:
        compile_eager(m, pol)(ids)
    err = inner(e.value)
    assert isinstance(err, lrcompile.SiteError) and "\n" not in str(err)
    assert "max_error 0.01" in str(err) and "rule 1" in str(err)


def multi_line_failure(monkeypatch):
    from lrcompile.families import lowrank

    def boom(*a, **k):
        raise RuntimeError("svd did not converge\n  at line 2 of a long torch message\n  and line 3")

    monkeypatch.setattr(lowrank, "truncated_svd", boom)


def test_failure_messages_are_first_line_only(monkeypatch, tmp_path):
    multi_line_failure(monkeypatch)
    lin = nn.Linear(16, 16)
    rep = tmp_path / "r.json"
    with pytest.warns(UserWarning) as got:
        compile_eager(lin, all_lowrank(4), report=str(rep))(torch.randn(2, 16))
    msgs = [str(w.message) for w in got if "kept dense" in str(w.message)]
    assert msgs and all("\n" not in m for m in msgs)
    assert "RuntimeError: svd did not converge)" in msgs[0]
    row = json.loads(rep.read_text())["sites"][0]
    assert row["status"] == "failed" and row["reason"] == "RuntimeError: svd did not converge"
    torch._dynamo.reset()
    strict = all_lowrank(4, strict=True)
    with pytest.raises(Exception) as e:
        compile_eager(nn.Linear(16, 16), strict)(torch.randn(2, 16))
    err = inner(e.value)
    assert isinstance(err, lrcompile.SiteError) and "\n" not in str(err) and "svd did not converge" in str(err)


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"inductor": "no"}, "option 'inductor' must be true or false, got 'no'"),
        ({"report": 3}, "option 'report' must be a file path, got 3"),
        ({"tune": None}, "option 'tune' must be true or false, got None"),
        ({"strict": "yes"}, "option 'strict' must be true or false"),
        ({"inductor": "yes"}, "option 'inductor' must be true or false, got 'yes'"),
        ({"fuse": 1}, "option 'fuse' must be true or false, got 1"),
        ({"verbose": "loud"}, "option 'verbose' must be true or false, got 'loud'"),
        ({"inductr": False}, "unknown option 'inductr' (did you mean 'inductor'?)"),
    ],
)
def test_option_types_are_one_line_errors(options, expected):
    with pytest.raises(Exception) as e:
        torch.compile(nn.Linear(4, 4), backend="lrcompile", options=options)(torch.randn(2, 4))
    err = inner(e.value)
    assert isinstance(err, lrcompile.LrcompileError) and "\n" not in str(err) and expected in str(err)


def test_failed_stale_repair_runs_dense_and_warns_once():
    lin = nn.Linear(16, 16)
    x = torch.randn(4, 16)
    c = compile_eager(lin, all_lowrank(4))
    c(x)
    U = lin.lrcompile.U.detach().clone()
    with pytest.MonkeyPatch.context() as mp:
        multi_line_failure(mp)
        with torch.no_grad():
            lin.weight.add_(1.0)  # the factors are stale: their repair now fails
        with pytest.warns(
            UserWarning, match="recomputing stale lowrank factors failed .*runs the dense weights"
        ) as got:
            out = c(x)
        assert len([w for w in got if "stale" in str(w.message)]) == 1 and "\n" not in str(got[0].message)
        torch.testing.assert_close(lin.lrcompile.U.detach(), U)  # the factors are left as they were ...
        torch.testing.assert_close(out, lin(x))  # ... and the site computes with its new dense weight
        with torch.no_grad():
            lin.weight.add_(1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per site, not per call
            torch.testing.assert_close(c(x), lin(x))
    # the repair works again: the next change of the weight is recomputed, factors again
    with torch.no_grad():
        lin.weight.mul_(0.5)
    out = c(x)
    W = lin.weight.detach().double()
    U_, S_, Vh_ = torch.linalg.svd(W)
    torch.testing.assert_close(lin.lrcompile.to_dense().double(), (U_[:, :4] * S_[:4]) @ Vh_[:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(out, x @ lin.lrcompile.to_dense().T + lin.bias)


def test_session_is_keyed_by_the_options_not_their_id(tmp_path):
    lin = nn.Linear(32, 32)
    x = torch.randn(2, 32)
    rep = tmp_path / "r.json"
    opts = {"policy": all_lowrank(4), "inductor": False, "report": str(rep)}
    torch.compile(lin, backend="lrcompile", options=opts)(x)
    assert json.loads(rep.read_text())["sites"][0]["status"] == "rewritten"
    torch._dynamo.reset()
    opts["policy"] = all_lowrank(2)  # the same dict object (same id), another policy: not the old session
    torch.compile(lin, backend="lrcompile", options=opts)(x)
    row = json.loads(rep.read_text())["sites"][0]
    # a new session under the new policy: it replaces the rank-4 factors the first compile made
    assert row["status"] == "rewritten" and row["rank"] == 2 and lin.lrcompile.cfg.rank == 2


NET = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))


def split_by_a_break(x):  # a function, not a module: the backend finds no root module
    h = NET[0](x)
    torch._dynamo.graph_break()
    return NET[2](h)


def test_rootless_graphs_share_one_report(tmp_path):
    rep = tmp_path / "r.json"
    x = torch.randn(3, 16)
    ref = split_by_a_break(x)
    out = torch.compile(
        split_by_a_break,
        backend="lrcompile",
        options={"policy": all_lowrank(16), "inductor": False, "report": str(rep)},
    )(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    rows = json.loads(rep.read_text())["sites"]
    assert [r["fqn"] for r in rows] == ["0", "2"]  # both graphs' sites: one session for the compile
    assert all("module not found" in " ".join(r["notes"]) for r in rows)


def test_tied_head_reports_the_broken_tie(toy, tmp_path):
    m, ids = toy
    rep = tmp_path / "r.json"
    compile_eager(m, all_lowrank(6), report=str(rep))(ids)
    rows = {s["fqn"]: s for s in json.loads(rep.read_text())["sites"]}
    assert any("tie broken" in n for n in rows["lm_head"]["notes"])
    assert not any("tie broken" in n for n in rows["blocks.0.fc"]["notes"])


def test_progress_bar_when_stderr_is_a_terminal(monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    compile_eager(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), all_lowrank(4))(torch.randn(2, 16))
    err = capsys.readouterr().err
    assert "lrcompile:" in err and "/2 " in err  # the bar counts the graph's two sites


@pytest.mark.parametrize("inductor", [True, False])
def test_inductor_option_decides_compile_fx(monkeypatch, inductor):
    import torch._inductor.compile_fx as cfx

    calls = []
    monkeypatch.setattr(cfx, "compile_fx", lambda gm, inputs, **kw: calls.append(gm) or gm.forward)
    lin = nn.Linear(16, 16)
    x = torch.randn(2, 16)
    out = torch.compile(lin, backend="lrcompile", options={"policy": all_lowrank(16), "inductor": inductor})(x)
    assert len(calls) == (1 if inductor else 0)
    torch.testing.assert_close(out, lin(x), atol=1e-5, rtol=1e-5)
    assert list(lowered(lin).values()) == ["rewritten"]


def test_random_init_end_to_end(tmp_path):
    import os

    lin = nn.Linear(64, 48)
    x = torch.randn(5, 64)
    rep = tmp_path / "r.json"
    pol = {"defaults": {"min_features": 0}, "rules": [{"match": "*", "method": "lowrank", "rank": 8, "init": "random"}]}
    out = compile_eager(lin, pol, report=str(rep))(x)
    f = lin.lrcompile
    torch.testing.assert_close(out, x @ f.to_dense().T + lin.bias)
    row = json.loads(rep.read_text())["sites"][0]
    W = lin.weight.detach().double()
    assert row["status"] == "rewritten" and row["rank"] == 8
    with torch.no_grad():
        err = float((W - f.to_dense().double()).norm() / W.norm())
    assert row["rel_error"] == pytest.approx(err, rel=1e-6)
    assert row["rel_error"] > 0.9  # fresh factors, unrelated to W
    assert f.V.detach().std().item() == pytest.approx(1 / 64**0.5, rel=0.2)  # LowRank.init's scale
    cache = os.path.join(os.environ["LRCOMPILE_CACHE_DIR"], "factors")
    assert not os.path.exists(cache) or not any(fs for _, _, fs in os.walk(cache))  # random factors: never cached


def test_failed_factorisation_stays_dense(toy, monkeypatch, tmp_path):
    m, ids = toy
    ref = m(ids)
    from lrcompile.families import lowrank

    def boom(*a, **k):
        raise RuntimeError("svd did not converge")

    monkeypatch.setattr(lowrank, "truncated_svd", boom)
    rep = tmp_path / "r.json"
    with pytest.warns(UserWarning, match="kept dense"):
        out = compile_eager(m, all_lowrank(4), report=str(rep))(ids)
    torch.testing.assert_close(out, ref)
    assert {s["status"] for s in json.loads(rep.read_text())["sites"] if s["kind"] == "linear"} == {"failed"}


def test_stale_factors_are_recomputed_after_load_state_dict():
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    other = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(5, 32)
    c = compile_eager(m, all_lowrank(32))
    torch.testing.assert_close(c(x), m(x), atol=1e-5, rtol=1e-5)
    assert isinstance(m[0].lrcompile, LowRank) and isinstance(m[2].lrcompile, LowRank)  # factors that can go stale
    dense = {k: v for k, v in other.state_dict().items()}
    m.load_state_dict(dense, strict=False)  # dense weights only: the factors are now stale
    torch.testing.assert_close(c(x), other(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["assign", "mmap_assign", "data_swap", "to_double"])
def test_stale_factors_follow_every_update_path(path, tmp_path):
    """Paths that replace the parameter object or its storage (not only its version counter) refit the factors."""
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    other = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(5, 32)
    c = compile_eager(m, all_lowrank(32))  # full rank: exact, so the compiled output is the dense model's
    torch.testing.assert_close(c(x), m(x), atol=1e-5, rtol=1e-5)
    assert isinstance(m[0].lrcompile, LowRank)  # rewritten: the checks below see the factors, not Dynamo's graph
    dense = {k: v.clone() for k, v in other.state_dict().items()}
    if path == "assign":
        m.load_state_dict(dense, strict=False, assign=True)
    elif path == "mmap_assign":
        torch.save(dense, tmp_path / "sd.pt")
        m.load_state_dict(torch.load(tmp_path / "sd.pt", mmap=True, weights_only=True), strict=False, assign=True)
    elif path == "data_swap":
        for k, q in other.named_parameters():
            m.get_parameter(k).data = q.detach().clone()
    else:
        m.double()
        other = m  # the same weights in float64
        x = x.double()
    torch.testing.assert_close(c(x), other(x), atol=1e-5, rtol=1e-5)


def test_trained_factors_are_kept_when_weight_changes():
    m = nn.Linear(16, 16)
    x = torch.randn(4, 16)
    c = compile_eager(m, all_lowrank(4))
    c(x)
    with torch.no_grad():
        m.lrcompile.U.mul_(2)  # the factors moved: they are the truth
        m.weight.add_(1)
    U = m.lrcompile.U.detach().clone()
    c(x)
    torch.testing.assert_close(m.lrcompile.U.detach(), U)


def refill_elsewhere(t: torch.Tensor, values: torch.Tensor) -> None:
    """What FSDP2 does to an unsharded parameter around every forward: free its storage, allocate it again (here
    at another address, the freed one held by `blocker` meanwhile) and copy the gathered values in, version
    counter kept."""
    s, before = t.untyped_storage(), t.data_ptr()
    nbytes = s.nbytes()
    s.resize_(0)
    blocker = torch.empty(nbytes, dtype=torch.uint8)  # noqa: F841 - takes the freed address
    s.resize_(nbytes)
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(t):
        t.copy_(values)
    assert t.data_ptr() != before  # the case under test: the same storage at another address


def test_a_storage_refilled_at_another_address_is_not_a_change():
    """Under FSDP2 the dense weight and the trained factors are refilled by all-gathers before every forward,
    versions kept. The weight landing elsewhere while the factors did not must not look like a stale weight: a
    refit would overwrite the trained factors with the dense weight's SVD. (Dynamo makes a compiled model's
    storages unresizable, so this drives the feed the compiled graph calls directly.)"""
    from lrcompile.runtime.attach import Feed

    weight = nn.Parameter(torch.randn(16, 16))
    struct = LowRank.from_dense(weight.detach(), None, LowRankConfig(rank=4))
    feed = Feed(struct, weight, transposed=False)
    trained = struct.U.detach() * 2
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(struct.U):
        struct.U.copy_(trained)  # the trained factor gathered in place
    refill_elsewhere(weight, weight.detach().clone())
    feed.tensors()
    torch.testing.assert_close(struct.U.detach(), trained)  # not refit
    with torch.no_grad():
        weight.mul_(2)  # a real change of the dense weight (its version moves): refit
    feed.tensors()
    u, sv, vh = torch.linalg.svd(weight.detach())
    torch.testing.assert_close(struct.to_dense().detach(), u[:, :4] @ torch.diag(sv[:4]) @ vh[:4], atol=1e-4, rtol=1e-4)


def test_no_policy_keeps_everything_dense(toy, tmp_path):
    m, ids = toy
    ref = m(ids)
    rep = tmp_path / "r.json"
    out = torch.compile(m, backend="lrcompile", options={"inductor": False, "report": str(rep)})(ids)
    torch.testing.assert_close(out, ref)
    assert {s["status"] for s in json.loads(rep.read_text())["sites"]} == {"dense"}
    assert not any(".lrcompile" in n for n, _ in m.named_parameters())


def test_unknown_option_is_one_line_error(toy):
    m, ids = toy
    with pytest.raises(Exception, match="unknown option 'polcy'"):
        torch.compile(m, backend="lrcompile", options={"polcy": {}})(ids)


def test_policy_error_surfaces_through_compile(toy, tmp_path):
    m, ids = toy
    p = tmp_path / "bad.yaml"
    p.write_text("rules:\n  - match: '*'\n    method: lowrank\n    rank: zero\n")
    with pytest.raises(Exception, match=r"bad\.yaml:4: rule 1"):
        torch.compile(m, backend="lrcompile", options={"policy": str(p)})(ids)


@pytest.mark.slow
def test_inductor_end_to_end_forward_and_backward(toy):
    m, ids = toy
    ref = m(ids)
    c = torch.compile(m, backend="lrcompile", options={"policy": all_lowrank(10_000)})
    out = c(ids)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert m.blocks[1].lrcompile_w.V.grad is not None


def test_budget_sites_left_dense_are_reported_skipped_with_a_reason(tmp_path):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.thin = nn.Linear(2, 64, bias=False)  # rank 1 costs 66 of 128: the budget does better elsewhere
            self.sq = nn.Linear(64, 64, bias=False)
            self.w = nn.Parameter(torch.randn(64, 64) / 8)  # functional: one of the budget's sites too

        def forward(self, x):
            return F.linear(self.sq(self.thin(x)), self.w)

    m = M()
    x = torch.randn(3, 2)
    rep = tmp_path / "r.json"
    pol = {
        "defaults": {"min_features": 0},
        "budget": {"params": 0.5, "allocate": "spectrum"},  # by spectra: the thin site's error is cheapest dense
        "rules": [{"match": "*", "method": "lowrank"}],
    }
    out = compile_eager(m, pol, report=str(rep))(x)
    rows = {r["fqn"]: r for r in json.loads(rep.read_text())["sites"]}
    assert rows["thin"]["status"] == "skipped" and "budget keeps it dense" in rows["thin"]["reason"]
    assert rows["w"]["status"] == "rewritten" and rows["w"]["allocated_rank"] == rows["w"]["rank"]
    assert rows["sq"]["status"] == "rewritten" and rows["thin"]["params_after"] == rows["thin"]["params_before"]
    ref = x.double() @ m.thin.weight.detach().double().T @ truncated(m.sq, rows["sq"]["rank"]).T
    torch.testing.assert_close(out.double(), ref @ truncated_param(m.w, rows["w"]["rank"]).T, atol=1e-4, rtol=1e-4)
    # a model passed to a compiled function: its call cannot be traced again for the site list, so the plan
    # lists modules only, with a warning, and the functional site (named from the function's frame) says so
    torch._dynamo.reset()
    rep2 = tmp_path / "r2.json"
    with pytest.warns(UserWarning, match="functional sites are left out"):
        torch.compile(
            lambda t, mod: mod(t), backend="lrcompile", options={"policy": pol, "inductor": False, "report": str(rep2)}
        )(x, M())
    rows = {r["fqn"]: r for r in json.loads(rep2.read_text())["sites"]}
    functional = [r for f, r in rows.items() if f not in ("thin", "sq")]
    assert len(functional) == 1 and functional[0]["status"] == "skipped"
    assert "budget planned none" in functional[0]["reason"]


def truncated_param(p, rank):
    U, S, Vh = torch.linalg.svd(p.detach().double())
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


class BrokenBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        x = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(x)


class Blocks(nn.Module):
    """A graph break inside a loop over blocks: Dynamo skips this frame and compiles BrokenBlock.forward as a frame
    of its own, one graph for every block (the blocks' parameters are its inputs)."""

    def __init__(self, n=3):
        super().__init__()
        self.blocks = nn.ModuleList([BrokenBlock() for _ in range(n)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def truncated(lin, rank):
    U, S, Vh = torch.linalg.svd(lin.weight.detach().double())
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def reference(m, x, ranks):
    """float64 forward of Blocks with each linear at its rank (None: dense)."""
    h = x.double()
    for i, blk in enumerate(m.blocks):
        for name in ("a", "b"):
            lin = getattr(blk, name)
            r = ranks.get(f"blocks.{i}.{name}")
            W = truncated(lin, r) if r else lin.weight.detach().double()
            h = h @ W.T + lin.bias.detach().double()
            h = torch.relu(h) if name == "a" else h
    return h


def test_frames_of_submodules_are_named_from_the_model_and_share_one_report(tmp_path):
    m = Blocks()
    x = torch.randn(4, 16)
    rep = tmp_path / "r.json"
    calls = []
    import lrcompile.backend

    real = lrcompile.backend.find_sites
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lrcompile.backend, "find_sites", lambda gm, ex: calls.append(1) or real(gm, ex))
        c = compile_eager(m, all_lowrank(4, guard="off"), report=str(rep))
        out = c(x)
    rows = {r["fqn"]: r for r in json.loads(rep.read_text())["sites"]}
    # fewer graphs than sites: blocks run graphs compiled for another block (block 0's input needs no grad,
    # the others' do: Dynamo compiles a second version of the first graph)
    shared = [f for f, r in rows.items() if any("runs the graph compiled for" in n for n in r["notes"])]
    assert len(calls) < 6 and len(shared) == 6 - len(calls), (calls, shared)
    assert set(rows) == {f"blocks.{i}.{n}" for i in range(3) for n in "ab"}
    assert all(r["status"] == "rewritten" and r["rank"] == 4 for r in rows.values())
    for i in range(3):  # each block has its own factors, attached to its own modules
        assert m.blocks[i].a.lrcompile is not m.blocks[0].a.lrcompile or i == 0
        torch.testing.assert_close(
            m.blocks[i].a.lrcompile.to_dense().double(), truncated(m.blocks[i].a, 4), atol=1e-5, rtol=0
        )
    ref = reference(m, x, {f: 4 for f in rows})
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()  # training reaches every block's factors
    assert all(blk.b.lrcompile.U.grad is not None and blk.b.lrcompile.U.grad.abs().sum() > 0 for blk in m.blocks)
    x2 = torch.randn(4, 16)
    torch.testing.assert_close(c(x2).double(), reference(m, x2, {f: 4 for f in rows}), atol=1e-5, rtol=1e-5)


def test_an_instance_the_shared_graph_cannot_serve_runs_dense_with_a_warning(tmp_path):
    m = Blocks(2)
    x = torch.randn(4, 16)
    rep = tmp_path / "r.json"
    pol = {
        "defaults": {"min_features": 0, "guard": "off"},
        "rules": [
            {"match": "blocks.1.a", "method": "lowrank", "rank": 6},
            {"match": "*", "method": "lowrank", "rank": 4},
        ],
    }
    with (
        pytest.warns(
            UserWarning, match=r"the policy gives blocks\.1\.a lowrank .*rank=6.*the graph runs lowrank"
        ) as got,
        torch.no_grad(),
    ):  # no input needs grad: block 1 runs exactly block 0's graphs
        out = compile_eager(m, pol, report=str(rep))(x)
    assert all("\n" not in str(w.message) for w in got)
    rows = {r["fqn"]: r for r in json.loads(rep.read_text())["sites"]}
    assert {f: rows[f]["status"] for f in rows} == {
        "blocks.0.a": "rewritten",
        "blocks.0.b": "rewritten",
        "blocks.1.a": "failed",
        "blocks.1.b": "rewritten",
    }  # b: the next graph
    assert "runs dense" in rows["blocks.1.a"]["reason"]
    assert not hasattr(m.blocks[1].a, "lrcompile")  # nothing made for an instance that runs dense
    assert hasattr(m.blocks[1].b, "lrcompile")
    ref = reference(m, x, {"blocks.0.a": 4, "blocks.0.b": 4, "blocks.1.b": 4})
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_blocks_compiled_one_by_one_get_their_own_factors():
    """Regional compilation (each block compiled by itself): Dynamo reuses block 0's graphs for the others."""
    m = Blocks(3)
    x = torch.randn(4, 16)
    for blk in m.blocks:
        blk.compile(backend="lrcompile", options={"policy": all_lowrank(5, guard="off"), "inductor": False})
    with torch.no_grad():
        out = m(x)
    assert len({id(blk.a.lrcompile) for blk in m.blocks}) == 3
    ranks = {f"blocks.{i}.{n}": 5 for i in range(3) for n in "ab"}
    torch.testing.assert_close(out.double(), reference(m, x, ranks), atol=1e-5, rtol=1e-5)


def test_a_second_compile_with_another_policy_takes_effect(tmp_path):
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(4, 64)
    first = compile_eager(m, all_lowrank(8))
    first(x)
    assert m[0].lrcompile.cfg.rank == 8
    rep = tmp_path / "r.json"
    out = compile_eager(m, all_lowrank(64), report=str(rep))(x)  # full rank now: the dense model's function
    assert m[0].lrcompile.cfg.rank == 64 and m[2].lrcompile.cfg.rank == 64
    rows = {r["fqn"]: r for r in json.loads(rep.read_text())["sites"]}
    assert rows["0"]["status"] == "rewritten" and rows["0"]["rank"] == 64
    assert any("earlier compile" in n for n in rows["0"]["notes"])
    torch.testing.assert_close(out, m(x), atol=1e-4, rtol=1e-4)
    with pytest.warns(UserWarning, match="removed or replaced"):  # the first graph's factors are gone: dense
        torch.testing.assert_close(first(x), m(x), atol=1e-5, rtol=1e-5)
    keep = {"rules": [{"match": "*", "method": "dense"}]}
    compile_eager(m, keep)(x)
    assert not hasattr(m[0], "lrcompile")  # a dense rule runs the dense weight again


def test_factors_installed_by_rewrite_are_not_replaced_by_a_compile_policy():
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(4, 64)
    lrcompile.rewrite(m, all_lowrank(8), (x,))
    compile_eager(m, all_lowrank(32))(x)
    assert isinstance(m[0], LowRank) and m[0].cfg.rank == 8
    assert lowered(m) == {"0": "installed", "2": "installed"}  # the compile saw them and used them as they are


def test_a_rule_that_matches_nothing_warns_on_the_backend_path():
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    pol = {
        "defaults": {"min_features": 0},
        "rules": [
            {"match": "encoder.*", "method": "lowrank", "rank": 4},
            {"match": "0", "method": "lowrank", "rank": 4},
        ],
    }
    with pytest.warns(UserWarning, match=r"rule 1 \(match 'encoder\.\*'\) matches no module or parameter") as got:
        compile_eager(m, pol)(torch.randn(2, 16))
    assert not any("rule 2" in str(w.message) for w in got)


def test_parameters_made_under_inference_mode_are_rewritten(tmp_path):
    with torch.inference_mode():
        m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    x = torch.randn(2, 32)
    rep = tmp_path / "r.json"
    with torch.inference_mode():
        out = compile_eager(m, all_lowrank(8, guard="off"), report=str(rep))(x)
    assert {r["status"] for r in json.loads(rep.read_text())["sites"]} == {"rewritten"}
    with torch.inference_mode():
        h = torch.relu(x @ m[0].lrcompile.to_dense().T + m[0].bias)
        ref = h @ m[2].lrcompile.to_dense().T + m[2].bias
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", [{"method": "blast", "blocks": 5, "rank": 2}, {"method": "monarch", "blocks": 64}])
def test_strict_raises_for_a_shape_the_family_cannot_take(rule):
    pol = {"defaults": {"min_features": 0, "strict": True}, "rules": [{"match": "*", **rule}]}
    with pytest.raises(Exception) as e:
        compile_eager(nn.Linear(32, 48), pol)(torch.randn(2, 32))
    err = inner(e.value)
    assert isinstance(err, lrcompile.SiteError) and "cannot take 32→48" in str(err) and "\n" not in str(err)


def test_refresh_refits_after_an_in_place_write_through_data():
    """`.data.mul_()` bypasses the version counter and keeps the storage: no stamp sees it; refresh() does."""
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(5, 32)
    c = compile_eager(m, all_lowrank(32))  # full rank: exact
    c(x)
    assert isinstance(m[0].lrcompile, LowRank)
    m[0].weight.data.mul_(2)
    assert (c(x) - m(x)).abs().max() > 1e-3  # the documented blind spot
    assert lrcompile.refresh(m) == 2
    torch.testing.assert_close(c(x), m(x), atol=1e-5, rtol=1e-5)
