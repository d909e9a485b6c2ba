"""The command line: check (valid, invalid, with a model), report, entry points."""

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import torch

from lrcompile.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_backend_entry_point_resolves_without_import():
    names = {e.name: e.value for e in entry_points(group="torch_dynamo_backends")}
    assert names.get("lrcompile") == "lrcompile.backend:lrcompile_backend"
    code = (
        "import torch; f = torch.compile(torch.nn.Linear(4, 4), backend='lrcompile', options={'inductor': False}); "
        "print(f(torch.randn(2, 4)).shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([2, 4])" in out.stdout


def test_check_valid_policy_with_model(capsys):
    assert main(["check", str(ROOT / "lrcompile/policies/compress-50.yaml")]) == 0
    policy = str(ROOT / "lrcompile/policies/demo.yaml")
    assert main(["check", policy, "--model", "lrcompile.demo.tiny:demo_model"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.attn.q_proj" in out and "rewritten" in out and "head" in out
    assert "matched by a rule" in out


def test_check_invalid_policy_is_one_line(tmp_path, capsys):
    p = tmp_path / "p.yaml"
    p.write_text("rules:\n  - match: '*'\n    method: monarc\n")
    assert main(["check", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: p.yaml:3: rule 1 (match '*'): unknown method 'monarc'") and "\n" not in err


def test_check_warns_about_rules_matching_nothing(tmp_path, capsys):
    p = tmp_path / "p.yaml"
    p.write_text("rules:\n  - match: 'nope.*'\n    method: dense\n")
    assert main(["check", str(p), "--model", "lrcompile.demo.tiny:demo_model"]) == 0
    assert "p.yaml:2: rule 1 (match 'nope.*') matches no site" in capsys.readouterr().out


def test_report_command(tmp_path, capsys):
    rep = tmp_path / "r.json"
    m = torch.nn.Sequential(torch.nn.Linear(16, 16))
    torch.compile(
        m,
        backend="lrcompile",
        options={
            "inductor": False,
            "report": str(rep),
            "policy": {"defaults": {"min_features": 0}, "rules": [{"match": "*", "method": "lowrank", "rank": 4}]},
        },
    )(torch.randn(2, 16))
    assert json.loads(rep.read_text())["sites"][0]["fqn"] == "0"
    assert main(["report", str(rep)]) == 0
    out = capsys.readouterr().out
    assert "lowrank" in out and "rewritten" in out
    assert main(["report", str(tmp_path / "missing.json")]) == 2


def console_script() -> str:
    exe = Path(sys.executable).with_name("lrcompile")  # installed by [project.scripts] next to the interpreter
    assert exe.exists(), exe
    return str(exe)


def test_help_runs_and_lists_the_commands():
    out = subprocess.run([console_script(), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for cmd in ("check", "report", "warmup", "demo", "cache"):
        assert cmd in out.stdout, cmd
    demo = subprocess.run([console_script(), "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert all(f"--{o}" in demo.stdout for o in ("d", "layers", "batch", "seq", "reps", "report"))
    assert "model width" in demo.stdout


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_model_factories_from_the_working_directory_and_from_files(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymodels.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n    return nn.Sequential(nn.Linear(16, 16)), (torch.randn(2, 16),)\n"
        "def boom():\n    raise RuntimeError('no weights here\\nsecond line')\n"
        "def wrong_inputs():\n    return nn.Linear(16, 16), (torch.randn(2, 7),)\n"
    )
    (tmp_path / "broken.py").write_text("def f(:\n")
    policy = tmp_path / "p.yaml"
    policy.write_text("rules:\n  - match: '*'\n    method: lowrank\n    rank: 4\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["check", str(policy), "--model", "mymodels:build"]) == 0  # a module in the working directory
    assert main(["check", str(policy), "--model", str(tmp_path / "mymodels.py") + ":build"]) == 0  # a file
    capsys.readouterr()
    for spec, expected in [
        ("mymodels:boom", "the factory raised RuntimeError: no weights here"),
        ("broken:f", "importing broken failed (SyntaxError"),
        ("mymodels:nothing", "has no callable 'nothing'"),
        ("mymodels:wrong_inputs", "does not run on its example inputs"),
        ("nowhere.py:f", "no such file nowhere.py"),
    ]:
        assert main(["check", str(policy), "--model", spec]) == 2
        assert expected in _err(capsys), spec


def test_report_on_a_json_that_is_not_a_report_is_one_line(tmp_path, capsys):
    for text in ('{"a": 1}', "[1, 2]", '{"sites": [{"fqn": 3}]}', "\xff"):
        p = tmp_path / "r.json"
        p.write_text(text, encoding="latin-1")
        assert main(["report", str(p)]) == 2
        assert "r.json" in _err(capsys)


def test_a_non_utf8_policy_is_one_line(tmp_path, capsys):
    p = tmp_path / "p.yaml"
    p.write_bytes(b"rules:\n  - match: \xff\n    method: dense\n")
    assert main(["check", str(p)]) == 2
    assert "not UTF-8" in _err(capsys)


def test_every_public_name_is_in_the_readme():
    import re

    import lrcompile

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [n for n in lrcompile.__all__ if not re.search(rf"\b{re.escape(n)}\b", readme)]
    assert not missing, f"public names the README does not mention: {missing}"
