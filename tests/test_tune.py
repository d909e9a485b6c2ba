"""The autotuner: choices by measurement, the persistent cache (warm, corrupt, concurrent), the `guard: dense`
contract, the report, and the `warmup` / `cache` commands."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import all_lowrank, compile_eager
from torch import nn

import lrcompile
import lrcompile.backend as backend
from lrcompile.cli import main
from lrcompile.tune import cache, shapelog, timing
from lrcompile.tune.candidates import DENSE, EXTRA, REFERENCE, Candidate, candidates_for, implementation
from lrcompile.tune.select import bucket, measure, pick, spec_for

ROOT = Path(__file__).resolve().parents[1]


def mlp(d=64, h=96):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))


def small_model():
    """CLI factory: (model, example_inputs)."""
    return mlp(), (torch.randn(4, 16, 64),)


def report_rows(path):
    return {r["fqn"]: r for r in json.loads(Path(path).read_text())["sites"]}


def cache_file():
    return Path(cache.path())


def test_warm_cache_second_compile_runs_no_timing(tmp_path):
    x = torch.randn(4, 16, 64)
    before = timing.RUNS
    with torch.no_grad():
        compile_eager(mlp(), all_lowrank(8), report=str(tmp_path / "a.json"))(x)
    assert timing.RUNS > before
    assert all(r["impl"] and "measured now" in r["notes"][-1] for r in report_rows(tmp_path / "a.json").values())
    torch._dynamo.reset()
    cache._memo.clear()  # read back from disk, as a new process would
    before = timing.RUNS
    with torch.no_grad():
        out = compile_eager(mlp(), all_lowrank(8), report=str(tmp_path / "b.json"))(x)
    assert timing.RUNS == before
    rows = report_rows(tmp_path / "b.json")
    assert all("autotune cache" in r["notes"][-1] for r in rows.values())
    assert out.shape == x.shape


def test_token_buckets_share_entries():
    assert [bucket(n) for n in (1, 2, 3, 60, 64, 65, 1000)] == [1, 2, 4, 64, 64, 128, 1024]
    cold = timing.RUNS
    with torch.no_grad():
        compile_eager(mlp(), all_lowrank(8))(torch.randn(3, 20, 64))  # 60 tokens -> bucket 64
    assert timing.RUNS > cold  # the cold compile timed its candidates: the entries exist
    torch._dynamo.reset()
    before = timing.RUNS
    with torch.no_grad():
        compile_eager(mlp(), all_lowrank(8))(torch.randn(4, 16, 64))  # 64 tokens: same bucket, no timing
    assert timing.RUNS == before


def test_chosen_implementation_is_what_the_graph_runs(monkeypatch, tmp_path):
    """A cache entry that makes `pretransposed` fastest: the rewrite emits it, the report says so, numbers hold."""
    m, x = mlp(), torch.randn(4, 16, 64)
    for lin in (m[0], m[2]):
        spec = spec_for(
            "lowrank", _cfg(lin, 10_000), lin.in_features, lin.out_features, True, 64, torch.float32, "cpu", False
        )
        cache.store({spec.key(): {"ms": {REFERENCE: 3.0, "addmm": 2.0, "pretransposed": 1.0, DENSE: 9.0}}})
    emitted = []
    real = backend.rewrite_graph
    monkeypatch.setattr(
        backend,
        "rewrite_graph",
        lambda gm, chosen, **kw: emitted.extend(c[2] for c in chosen) or real(gm, chosen, **kw),
    )
    before = timing.RUNS
    with torch.no_grad():
        ref = mlp()(x)
        out = compile_eager(m, all_lowrank(10_000), report=str(tmp_path / "r.json"))(x)  # full rank: exact
    assert timing.RUNS == before
    assert emitted == [implementation("lowrank", "pretransposed")] * 2
    rows = report_rows(tmp_path / "r.json")
    assert {r["impl"] for r in rows.values()} == {"pretransposed"} and rows["0"]["tuned_ms"] == 1.0
    assert rows["0"]["dense_ms"] == 9.0 and "pretransposed at least 5% faster" in rows["0"]["notes"][-1]
    assert ((out - ref).norm() / ref.norm()) < 1e-5


def _cfg(lin, rank):
    from lrcompile.families.lowrank import LowRankConfig

    return LowRankConfig(rank=rank).resolve(lin.in_features, lin.out_features)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong-schema"])
def test_corrupt_cache_is_set_aside_and_rebuilt(damage):
    x = torch.randn(4, 16, 64)
    with torch.no_grad():
        compile_eager(mlp(), all_lowrank(8))(x)
    f = cache_file()
    text = f.read_text()
    f.write_text(
        {
            "truncated": text[: len(text) // 2],
            "garbage": "\x00\xff not json",
            "wrong-schema": json.dumps({"format": 1, "entries": {"k": {"ms": "fast"}}}),
        }[damage]
    )
    torch._dynamo.reset()
    before = timing.RUNS
    with pytest.warns(UserWarning, match="autotune cache .* is corrupt; moved to .*corrupt and rebuilding"):
        with torch.no_grad():
            compile_eager(mlp(), all_lowrank(8))(x)
    assert timing.RUNS > before  # re-measured
    assert Path(str(f) + ".corrupt").exists()
    assert len(json.loads(f.read_text())["entries"]) == 2  # rebuilt: both shapes again


# The writers import the cache module alone (bare package shells, no torch): they start in a fraction of a second.
CHILD = r"""
import os, sys, time, types
for name in ("lrcompile", "lrcompile.tune"):
    pkg = types.ModuleType(name)
    pkg.__path__ = [os.path.join(sys.argv[3], *name.split("."))]
    sys.modules[name] = pkg
from lrcompile.tune import cache
open(sys.argv[2] + "." + sys.argv[1], "w").close()  # ready
while not os.path.exists(sys.argv[2]):
    time.sleep(0.002)
for i in range(60):
    cache.store({f"{sys.argv[1]}-{i}": {"ms": {"functional": float(i)}}})
"""


def test_two_processes_writing_at_once_keep_the_union(tmp_path):
    go = tmp_path / "go"
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, name, str(go), str(ROOT)], env=env, stderr=subprocess.PIPE, text=True
        )
        for name in ("a", "b")
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"go.{n}").exists() for n in "ab") and time.time() < deadline:
        time.sleep(0.01)
    go.touch()  # both imported: they start writing together
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
    keys = set(cache.entries())
    assert keys == {f"{n}-{i}" for n in "ab" for i in range(60)}
    leftovers = [p.name for p in cache_file().parent.iterdir() if p.suffix in (".tmp", ".corrupt")]
    assert leftovers == []


def test_guard_dense_only_where_the_policy_asks(tmp_path, monkeypatch):
    """Full rank 256 on a 256×256 layer: the low-rank chain costs twice the dense FLOPs and saves no parameters.
    Under `guard: off` the site stays rewritten and the report says it is slower; by default (and with
    `guard: dense`) the original layer runs, no factors."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared machine's thread contention swamps 2× FLOPs; one thread measures them
    # the measurement must be cached whatever the machine's load does to its spread (that rule has its own test)
    monkeypatch.setattr(timing, "UNSTABLE", float("inf"))
    try:
        x = torch.randn(1024, 256)
        lin = nn.Linear(256, 256)
        with torch.no_grad():
            ref = lin(x)
            compile_eager(lin, all_lowrank(256, guard="off"), report=str(tmp_path / "plain.json"))(x)
        plain = report_rows(tmp_path / "plain.json")[""]
        assert plain["status"] == "rewritten" and plain["impl"] != DENSE
        assert plain["dense_ms"] < plain["tuned_ms"]
        assert "slower than the dense layer it replaced" in plain["notes"][-1]
        torch._dynamo.reset()
        lin2 = nn.Linear(256, 256)
        with torch.no_grad():
            lin2.weight.copy_(lin.weight)
            lin2.bias.copy_(lin.bias)
        before = timing.RUNS
        for guard, reason in (("dense", "guard: dense"), (None, "the rewrite is exact and saves nothing here")):
            torch._dynamo.reset()
            with torch.no_grad():
                out = compile_eager(lin2, all_lowrank(256, guard=guard), report=str(tmp_path / "guard.json"))(x)
            assert timing.RUNS == before  # the same measurement serves all: the guard changes the choice only
            g = report_rows(tmp_path / "guard.json")[""]
            assert g["status"] == "skipped" and g["impl"] == DENSE and g["reason"].startswith(reason)
            assert not hasattr(lin2, "lrcompile")  # no factors made or attached
            assert torch.equal(out, ref)
    finally:
        torch.set_num_threads(threads)


def test_pick_honours_the_guard_and_the_noise_margin():
    entry = {"ms": {REFERENCE: 2.0, "addmm": 1.97, DENSE: 1.0}}
    assert pick(entry, dense_why=None)[0] == REFERENCE  # 1.5 % faster is noise: the reference stays
    assert "slower than the dense layer" in pick(entry, dense_why=None)[1]
    assert pick(entry, dense_why="guard: dense") == (
        DENSE,
        "guard: dense: the original layer is faster (dense 1 ms, addmm 1.97 ms, functional 2 ms)",
    )
    assert pick({"ms": {REFERENCE: 2.0, "addmm": 1.5, DENSE: 1.45}}, dense_why="x")[0] == "addmm"  # within margin


def test_rule_level_guard_and_adapters_never_fall_back():
    from lrcompile.policy.load import load_policy

    p = load_policy(
        {"rules": [{"match": "a", "method": "lowrank", "rank": 4, "guard": "dense"}, {"match": "*", "method": "lora"}]}
    )
    assert p.rules[0].guard == "dense" and p.rules[1].guard is None and p.defaults.guard is None
    assert DENSE not in [c.name for c in candidates_for("lora", 3, "cpu", grad=False)]


def test_merged_adapters_only_where_they_compute_the_same_thing():
    names = lambda fam, n, grad: [c.name for c in candidates_for(fam, n, "cpu", grad)]  # noqa: E731
    assert names("lora", 3, False) == [REFERENCE, "merged"]
    assert names("lora", 3, True) == [REFERENCE]  # training: merged needs a full dW GEMM the timing never sees
    assert names("lora", 4, False) == [REFERENCE]  # dropout tensor present
    assert names("noble", 9, False) == [REFERENCE]
    assert names("lowrank", 2, True) == [REFERENCE, "addmm", "pretransposed", DENSE]


def test_adapters_tune_merged_in_inference_and_skip_timing_in_training(tmp_path):
    lora = {"rules": [{"match": "*", "method": "lora", "rank": 4, "init": "gaussian"}]}
    x = torch.randn(4, 16, 64)
    m = mlp()
    before = timing.RUNS
    compile_eager(m, lora, report=str(tmp_path / "train.json"))(x)  # gradients on: merged is no candidate
    assert timing.RUNS == before
    assert all(
        r["impl"] == REFERENCE and "only implementation" in r["notes"][-1]
        for r in report_rows(tmp_path / "train.json").values()
    )
    with torch.no_grad():
        for lin in (m[0], m[2]):
            lin.lrcompile.lora_B.normal_()  # a non-zero branch, so that merged vs unmerged is a real comparison
    torch._dynamo.reset()
    with torch.no_grad():
        ref = compile_eager(m, lora, tune=False)(x)  # the family's own functional
    torch._dynamo.reset()
    with torch.no_grad():
        out = compile_eager(m, lora, report=str(tmp_path / "infer.json"))(x)
    assert timing.RUNS > before
    rows = report_rows(tmp_path / "infer.json")
    assert all(r["impl"] in (REFERENCE, "merged") and "merged" in r["notes"][-1] for r in rows.values())
    assert ((out - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize(
    "family,cfg", [("lowrank", {"rank": 6}), ("lora", {"rank": 4}), ("dora", {"rank": 4}), ("vera", {"rank": 4})]
)
def test_every_lossless_candidate_passes_the_gate(family, cfg):
    from lrcompile.families import FAMILIES

    c = FAMILIES[family].Config(**cfg)
    c = c.resolve(40, 24) if hasattr(c, "resolve") else c
    spec = spec_for(family, c, 40, 24, True, 30, torch.float32, "cpu", False)
    entry = measure(spec, budget_s=0.01)
    assert entry["discarded"] == {}
    assert set(entry["ms"]) == {x.name for x in candidates_for(family, len(spec.tensor_shapes), "cpu", False)}


@pytest.mark.parametrize("family", ["monarch", "lowrank"])
def test_measurement_ignores_the_callers_autocast(family):
    """A compile under torch.autocast tunes inside the backend call (torch 2.11 leaves autocast in effect there):
    the spec's dtype is timed, and no candidate fails on autocast's mixed dtypes."""
    from lrcompile.families import FAMILIES

    c = FAMILIES[family].Config(**({"rank": 6} if family == "lowrank" else {}))
    c = c.resolve(32, 48) if hasattr(c, "resolve") else c
    spec = spec_for(family, c, 32, 48, True, 24, torch.float32, "cpu", True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        entry = measure(spec, budget_s=0.01)
        assert torch.is_autocast_enabled("cpu")  # the caller's state is back
    assert entry["discarded"] == {}
    assert set(entry["ms"]) == {x.name for x in candidates_for(family, len(spec.tensor_shapes), "cpu", True)}


def test_a_wrong_candidate_is_discarded(monkeypatch):
    def wrong(x, weight, bias, U, V):
        return torch.zeros(*x.shape[:-1], U.shape[0])  # fastest of all, and wrong

    from lrcompile.families.lowrank import LowRank, LowRankConfig

    monkeypatch.setattr(LowRank, "candidates", LowRank.candidates + (Candidate("wrong", wrong),))  # EXTRA follows
    assert "wrong" in [c.name for c in EXTRA["lowrank"]]

    spec = spec_for("lowrank", LowRankConfig(rank=6), 40, 24, False, 30, torch.float32, "cpu", False)
    entry = measure(spec, budget_s=0.01)
    assert "output differs from the reference" in entry["discarded"]["wrong"] and "wrong" not in entry["ms"]


def test_tune_false_skips_timing_but_logs_shapes(tmp_path):
    before = timing.RUNS
    with torch.no_grad():
        compile_eager(mlp(), all_lowrank(8), tune=False, report=str(tmp_path / "r.json"))(torch.randn(4, 16, 64))
    assert timing.RUNS == before and not cache_file().exists()
    assert all("impl" not in r for r in report_rows(tmp_path / "r.json").values())
    logged = shapelog.read()
    assert sorted((d["in_features"], d["out_features"], d["tokens"]) for d in logged) == [(64, 96, 64), (96, 64, 64)]


def test_cli_warmup_and_cache_commands(tmp_path, capsys):
    assert (
        main(
            [
                "warmup",
                "--policy",
                json.dumps(all_lowrank(8)),
                "--model",
                "test_tune:small_model",
                "--shapes",
                "4x16,1x8",
                "--budget",
                "0.05",
            ]
        )
        == 0
    )
    assert "4 shapes from test_tune:small_model: 4 measured" in capsys.readouterr().out
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "64→96" in out and "96→64" in out and "4 autotune entries" in out
    export = tmp_path / "export.json"
    assert main(["cache", "export", str(export)]) == 0
    assert main(["cache", "clear"]) == 0
    assert "cleared 4 autotune entries" in capsys.readouterr().out and not cache_file().exists()
    assert main(["cache", "import", str(export)]) == 0
    assert len(cache.entries()) == 4
    # a compile after warmup measures nothing
    torch._dynamo.reset()
    before = timing.RUNS
    with torch.no_grad():
        compile_eager(mlp(), all_lowrank(8))(torch.randn(1, 8, 64))
    assert timing.RUNS == before
    # --from-log: the shapes compiles met (the log survives losing the cache)
    cache_file().unlink()
    capsys.readouterr()
    assert main(["warmup", "--from-log", "--budget", "0.05"]) == 0
    assert "2 shapes from the shape log: 2 measured" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["cache", "import", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cache import:") and "\n" not in err
    assert main(["warmup", "--shapes", "3xq", "--from-log"]) == 2


@pytest.mark.slow
def test_chosen_implementations_survive_inductor():
    """Every lossless candidate, forced through the cache, compiles under Inductor and gives the reference's numbers."""
    x = torch.randn(4, 16, 64)
    for impl in ("addmm", "pretransposed"):
        torch._dynamo.reset()
        cache.clear()
        for d_in, d_out in ((64, 96), (96, 64)):
            spec = spec_for(
                "lowrank", _cfg(nn.Linear(d_in, d_out), 8), d_in, d_out, True, 64, torch.float32, "cpu", False
            )
            cache.store(
                {spec.key(): {"ms": {REFERENCE: 3.0, "addmm": 3.0, "pretransposed": 3.0, impl: 1.0, DENSE: 9.0}}}
            )
        m = mlp()
        with torch.no_grad():
            eager = compile_eager(mlp(), all_lowrank(8), tune=False)(x)
            torch._dynamo.reset()
            out = torch.compile(m, backend="lrcompile", options={"policy": all_lowrank(8)})(x)
        assert ((out - eager).norm() / eager.norm()) < 1e-5, impl


def test_measurement_stays_within_its_time_budget():
    """Budget 0: the correctness gate (one run per candidate) and one timed round, nothing more."""
    spec = spec_for("lowrank", _cfg(nn.Linear(64, 96), 8), 64, 96, True, 64, torch.float32, "cpu", False)
    n = len(candidates_for("lowrank", 2, "cpu", grad=False))
    before = timing.RUNS
    entry = measure(spec, budget_s=0.0)
    assert timing.RUNS - before == 2 * n and len(entry["ms"]) == n


def test_dynamic_sizes_tune_once_per_token_bucket(tmp_path):
    """The recompile for a new size is symbolic (automatic dynamic); the tuner reads the sizes' hints, so sizes
    within one power-of-two bucket share one measurement."""
    from lrcompile.backend import lrcompile_backend

    calls = []

    def counting(gm, inputs):
        calls.append(any(isinstance(i, torch.SymInt) for i in inputs))
        return lrcompile_backend(
            gm, inputs, options={"policy": all_lowrank(8), "inductor": False, "report": str(tmp_path / "r.json")}
        )

    c = torch.compile(mlp(), backend=counting)
    before = timing.RUNS
    with torch.no_grad():
        c(torch.randn(3, 20, 64))  # 60 tokens
        measured = timing.RUNS - before
        for shape in ((2, 31, 64), (4, 15, 64)):  # 62 and 60 tokens: bucket 64
            c(torch.randn(*shape))
    assert measured > 0 and timing.RUNS - before == measured
    assert calls == [False, True]  # one static compile, one symbolic recompile that served both new sizes
    assert {r["notes"][-1].split(" (")[0] for r in report_rows(tmp_path / "r.json").values()} == {"tuned at 64 tokens"}


def test_cache_entry_without_the_reference_time_is_corrupt():
    p = cache_file()
    p.write_text(json.dumps({"format": cache.FORMAT, "entries": {"k": {"ms": {"addmm": 1.0}}}}))
    cache._memo.clear()
    with pytest.warns(UserWarning, match="corrupt"):
        assert cache.entries() == {}


def test_a_shape_log_line_left_without_newline_does_not_swallow_the_next():
    p = Path(shapelog.path())
    p.write_text('{"family": "lowrank", "broken": tru')  # a crash mid-write
    shapelog._logged.clear()
    spec = spec_for("lowrank", _cfg(nn.Linear(64, 96), 8), 64, 96, True, 64, torch.float32, "cpu", False)
    shapelog.record(spec.as_dict())
    assert shapelog.read() == [spec.as_dict()]


@pytest.mark.parametrize(
    "rank, guard, why",
    [
        (128, None, None),
        (256, None, "the rewrite is exact and saves nothing here"),
        (64, "dense", "guard: dense"),
        (256, "off", None),
    ],
)
def test_when_the_dense_layer_may_be_chosen(monkeypatch, rank, guard, why):
    """By default dense is a choice only where the rewrite is exact (full rank 256 on 256×256) — not at rank 128,
    which holds as many parameters but is lossy (a lossy fallback only when asked); `guard: dense` allows it
    anywhere, `guard: off` nowhere."""
    import lrcompile.tune as tune

    seen = []
    monkeypatch.setattr(tune, "tune_site", lambda site, decision, dense_why, enabled: seen.append(dense_why))
    with torch.no_grad():
        compile_eager(nn.Linear(256, 256), all_lowrank(rank, guard=guard))(torch.randn(8, 256))
    assert seen == [why]


def test_guard_values_are_checked():
    from lrcompile.errors import PolicyError
    from lrcompile.policy.load import load_policy

    with pytest.raises(PolicyError, match="guard must be one of 'dense', 'off', got 'never'"):
        load_policy({"defaults": {"guard": "never"}, "rules": []})


def test_a_cached_entry_naming_an_unknown_implementation_is_ignored(tmp_path):
    """An imported cache from other code names an implementation this code lacks: the rest of the entry decides."""
    m, x = mlp(), torch.randn(4, 16, 64)
    for lin in (m[0], m[2]):
        spec = spec_for(
            "lowrank", _cfg(lin, 8), lin.in_features, lin.out_features, True, 64, torch.float32, "cpu", False
        )
        cache.store({spec.key(): {"ms": {REFERENCE: 3.0, "warp_speed": 0.1, "addmm": 2.0, DENSE: 9.0}}})
    with torch.no_grad():
        compile_eager(m, all_lowrank(8), report=str(tmp_path / "r.json"))(x)
    rows = report_rows(tmp_path / "r.json")
    assert {r["impl"] for r in rows.values()} == {"addmm"} and {r["status"] for r in rows.values()} == {"rewritten"}


def test_timings_taken_under_a_burst_of_load_are_not_cached(monkeypatch, tmp_path):
    real = timing.samples_ms

    def noisy(fns, *a, **k):
        got = real(fns, *a, **k)
        return {n: [v[0]] + [v[0] * 10] * max(len(v), 5) for n, v in got.items()}  # fastest run, then 10x slower

    monkeypatch.setattr(timing, "samples_ms", noisy)
    m, x = mlp(), torch.randn(4, 16, 64)
    with torch.no_grad():
        compile_eager(m, all_lowrank(8), report=str(tmp_path / "r.json"))(x)
    rows = report_rows(tmp_path / "r.json")
    assert all("timings unstable under load" in r["notes"][-1] for r in rows.values())
    assert cache.entries() == {}  # the next compile measures again


def test_cache_list_survives_fields_of_the_wrong_type(capsys):
    from lrcompile.cli import main

    cache.store(
        {
            "lowrank|x": {"ms": {REFERENCE: 1.0, "addmm": 0.5}, "spec": ["not", "a", "dict"], "env": [1]},
            "lowrank|y": {"ms": {REFERENCE: 1.0}, "spec": {"family": ["l"], "in_features": {"a": 1}}},
        }
    )
    assert main(["cache", "list"]) == 0
    assert "2 autotune entries" in capsys.readouterr().out


def test_cache_list_and_clear_cover_every_cache(capsys):
    """`cache list` shows each entry's size option and the machine's full device name, and counts the factor
    cache and the shape log; `cache clear` empties all three."""
    from lrcompile.cli import main
    from lrcompile.factorize import cache as factors
    from lrcompile.tune.select import environment

    with torch.no_grad():
        compile_eager(mlp(), {**all_lowrank(8), "defaults": {"min_features": 0, "guard": "off"}}, tune=True)(
            torch.randn(1, 8, 64)
        )
    n_factors, _ = factors.summary()
    assert n_factors == 2 and shapelog.read()
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "rank 8" in out and environment("cpu")["device"] in out
    assert "2 factor entries" in out and f"{len(shapelog.read())} shapes in the shape log" in out
    assert main(["cache", "clear"]) == 0
    assert "2 factor entries" in capsys.readouterr().out
    assert factors.summary() == (0, 0) and cache.entries() == {} and shapelog.read() == []


def test_version_flag(capsys):
    from lrcompile.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"lrcompile {lrcompile.__version__} (torch ")
