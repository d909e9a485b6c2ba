"""Policy loading, matching and the one-line validation errors (file:line, rule, key)."""

import pytest

from lrcompile import PolicyError, load_policy

GOOD = """\
version: 1
defaults: {min_features: 64, max_error: 0.5}
rules:
  - match: "lm_head"
    method: dense
  - match: "re:.*\\\\.attn\\\\.(q|k|v)_proj"
    method: lowrank
    rank: 16
  - match: "*.mlp.*"
    method: lowrank
    rank: 0.5
    init: random
  - match: [fc1, "blocks.0.fc2"]
    method: lowrank
    rank: 4
"""


def test_loads_text_path_and_dict(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text(GOOD)
    a, b = load_policy(GOOD), load_policy(str(p))
    assert [r.method for r in a.rules] == ["dense", "lowrank", "lowrank", "lowrank"]
    assert a.digest == b.digest and b.source == "policy.yaml"
    assert a.defaults.min_features == 64 and a.defaults.max_error == 0.5
    c = load_policy({"rules": [{"match": "*", "method": "lowrank", "rank": 8}]})
    assert c.defaults.min_features == 128 and c.defaults.max_error is None  # built-in defaults


def test_first_match_wins_and_match_kinds():
    p = load_policy(GOOD)
    assert p.match("lm_head").method == "dense"
    assert p.match("model.attn.q_proj").config.rank == 16
    assert p.match("model.attn.o_proj") is None  # regex is a full match
    assert p.match("layers.3.mlp.up").config.rank == 0.5  # glob
    assert p.match("x.fc1").index == 4 and p.match("blocks.0.fc2").index == 4  # list: exact or dotted suffix
    assert p.match("xfc1") is None
    assert p.match("lm_head", kind="attention") is None  # rules without kind match linear sites only


def test_rules_have_line_numbers():
    p = load_policy(GOOD)
    assert [r.line for r in p.rules] == [4, 6, 9, 13]


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "rules:\n  - match: a\n    method: lowrnk\n    rank: 4\n",
            "<policy>:3: rule 1 (match 'a'): unknown method 'lowrnk' (did you mean 'lowrank'?)",
        ),
        (
            "rules:\n  - match: a\n    method: lowrank\n    rank: 0\n",
            "<policy>:4: rule 1 (match 'a'): method 'lowrank': rank must be >= 1, got 0",
        ),
        (
            "rules:\n  - match: a\n    method: lowrank\n    rank: 1.5\n",
            "<policy>:4: rule 1 (match 'a'): method 'lowrank': a float rank is a fraction",
        ),
        (
            "rules:\n  - match: a\n    method: lowrank\n    rank: true\n",
            "rank must be an int or a float in (0, 1], got True",
        ),
        (
            "rules:\n  - match: a\n    method: lowrank\n    rnak: 4\n",
            "<policy>:4: rule 1 (match 'a'): unknown option 'rnak' for method 'lowrank' (did you mean 'rank'?)",
        ),
        ("rules:\n  - match: 're:(('\n    method: dense\n", "<policy>:2: rule 1 (match 're:(('): bad regex '(('"),
        (
            "rules:\n  - match: a\n    method: lowrank\n",
            "<policy>:3: rule 1 (match 'a'): method 'lowrank' needs a 'rank'",
        ),
        ("rulez: []\n", "<policy>:1: unknown top-level key 'rulez' (did you mean 'rules'?)"),
        ("defaults: {min_features: -1}\n", "<policy>:1: defaults: min_features must be a non-negative int"),
        (
            "rules:\n  - match: a\n    kind: attention\n    method: lowrank\n    rank: 4\n",
            "does not apply to attention sites",
        ),
        ("rules:\n  - match: 3\n    method: dense\n", "'match' must be a string or a list of strings, got int"),
        ("rules:\n  - match: a\n    method: dense\n    rank: 3\n", "method 'dense' takes no options, got 'rank'"),
        ("rules: [a: b: c]\n", "<policy>:1: not valid YAML"),
        ("rules:\n  - just-a-string\n", "rule 1: a rule is a mapping"),
        ("budget: {params: 2}\n", "budget fraction must be in (0, 1]"),
        (
            "budget: {params: 0.5, allocate: gradient}\n",
            "budget allocate must be one of fisher, spectrum, sensitivity, got 'gradient'",
        ),
        ("version: 2\n", "unsupported policy version 2"),
        ("defaults: 5\n", "<policy>:1: defaults must be a mapping of min_features, max_error, strict, guard, got 5"),
        ("defaults: [1, 2]\n", "defaults must be a mapping"),
        ("rules: \x07\n", "<policy>: not valid YAML: unacceptable character #x0007"),  # a YAMLError without .problem
    ],
)
def test_errors_are_one_line_with_location(text, expected):
    with pytest.raises(PolicyError) as e:
        load_policy(text)
    msg = str(e.value)
    assert "\n" not in msg
    assert expected in msg, msg


def test_error_names_the_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("rules:\n  - match: a\n    method: lowrank\n    rank: -2\n")
    with pytest.raises(PolicyError, match=r"^mine\.yaml:4: rule 1"):
        load_policy(str(p))
    with pytest.raises(PolicyError, match="policy file not found"):
        load_policy(str(tmp_path / "missing.yaml"))


def test_a_path_without_yaml_suffix_is_read_as_a_file(tmp_path):
    p = tmp_path / "policy.txt"
    p.write_text(GOOD)
    pol = load_policy(str(p))
    assert pol.source == "policy.txt" and pol.digest == load_policy(GOOD).digest
    p.write_text("rules:\n  - match: a\n    method: lowrnk\n")
    with pytest.raises(PolicyError, match=r"^policy\.txt:3: rule 1"):
        load_policy(str(p))
    with pytest.raises(PolicyError, match="a policy is a mapping"):  # not a file: read as YAML text (a string)
        load_policy(str(tmp_path / "missing.txt"))


def test_rank_without_budget_is_fine_with_budget():
    p = load_policy({"rules": [{"match": "*", "method": "lowrank"}], "budget": {"params": 0.5}})
    assert p.rules[0].config.rank is None and p.budget == {"params": 0.5}
    for how in ("fisher", "spectrum", "sensitivity"):
        assert load_policy({"budget": {"flops": 0.5, "allocate": how}}).budget["allocate"] == how


def test_yaml_syntax_error_in_a_file_names_file_and_line(tmp_path):
    p = tmp_path / "broken.yml"
    p.write_text("version: 1\nrules:\n  - match: a\n    method: lowrank\n    rank: [4\n")
    with pytest.raises(PolicyError) as e:
        load_policy(str(p))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("broken.yml:") and "not valid YAML" in msg, msg
    assert int(msg.split(":")[1]) in (5, 6)  # the unclosed flow sequence: where PyYAML notices it


@pytest.mark.parametrize("name", ["missing.yaml", "missing.yml"])
def test_a_missing_yaml_path_is_not_read_as_yaml_text(tmp_path, name):
    with pytest.raises(PolicyError) as e:
        load_policy(str(tmp_path / name))
    assert str(e.value) == f"policy file not found: {tmp_path / name}"
    with pytest.raises(PolicyError, match="policy file not found"):
        load_policy(tmp_path / name)  # a PathLike is always a path
    # YAML text is still text, even on one line
    assert load_policy("rules: [{match: a, method: dense}]").rules[0].method == "dense"


def test_defaults_null_is_the_built_in_defaults():
    pol = load_policy("defaults:\nrules: []\n")
    assert pol.defaults.min_features == 128 and pol.defaults.max_error is None


BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    + "rules: *i\n"
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (BOMB, "YAML aliases (*name) are not allowed"),
        (
            "rules:\n  - match: a\n    match: b\n    method: dense\n",
            "<policy>:3: duplicate key 'match' (first at line 2)",
        ),
        ("rules: []\nrules: []\n", "<policy>:2: duplicate key 'rules'"),
        ("defaults: {max_error: .nan}\n", "max_error must be a non-negative number"),
        ("defaults: {max_error: .inf}\n", "max_error must be a non-negative number"),
        ("version: 1.0\n", "unsupported policy version 1.0"),
        ("version: true\n", "unsupported policy version True"),
        (
            "rules:\n  - match: 're:(a+)+b'\n    method: dense\n",
            "<policy>:2: rule 1 (match 're:(a+)+b'): regex '(a+)+b' repeats",
        ),
        ("rules:\n  - match: 're:(x|y*)*z'\n    method: dense\n", "can backtrack without bound"),
        (
            "rules:\n  - match: a\n    method: lowrank\n\n    rank: 4\n    rnak: 4\n",
            "<policy>:6: rule 1 (match 'a'): unknown option 'rnak'",
        ),
        ("version: 1\n\nrulez:\n  - match: a\n", "<policy>:3: unknown top-level key 'rulez'"),
    ],
)
def test_untrusted_policy_input_is_a_one_line_error(text, expected):
    import time

    t0 = time.perf_counter()
    with pytest.raises(PolicyError) as e:
        load_policy(text)
    assert time.perf_counter() - t0 < 2.0
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400 and expected in msg, msg


def test_plain_regexes_and_bounded_repeats_are_accepted():
    for pat in (r".*\.attn\.(q|k|v)_proj", r"(layers\.\d+\.)?mlp\.fc[12]", r"(ab){2}x*", r"blocks\.(1|2)\..*"):
        assert load_policy({"rules": [{"match": f"re:{pat}", "method": "dense"}]}).rules[0].match == f"re:{pat}"


def test_a_non_utf8_policy_file_is_a_one_line_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_bytes(b"rules:\n  - match: \xff\xfe\n    method: dense\n")
    with pytest.raises(PolicyError, match=r"bad\.yaml: not UTF-8 text") as e:
        load_policy(str(p))
    assert "\n" not in str(e.value)


def _mutations(text: str, rng):
    """Random edits of a valid policy: deleted, duplicated or swapped lines, spliced characters and values."""
    lines = text.splitlines()
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        i = rng.randrange(len(lines)) if lines else 0
        if op == 0 and lines:
            del lines[i]
        elif op == 1 and lines:
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif op == 2 and lines:
            s = lines[i]
            j = rng.randrange(len(s) + 1)
            lines[i] = (
                s[:j]
                + rng.choice(
                    [
                        "*",
                        "&x",
                        ":",
                        "[",
                        "{",
                        "'",
                        '"',
                        "-",
                        " ",
                        "\t",
                        "!!python/object:os.system",
                        "1e999",
                        ".nan",
                        "~",
                        "re:(a+)+",
                    ]
                )
                + s[j:]
            )
        elif op == 3 and lines:
            k = rng.randrange(len(lines))
            lines[i], lines[k] = lines[k], lines[i]
        elif op == 4:
            lines.insert(
                i,
                rng.choice(
                    [
                        "budget: {params: 0.5}",
                        "version: 2",
                        "defaults: {strict: true}",
                        "  - match: '*'\n    method: lora",
                        "rules: &r []",
                        "x: *r",
                    ]
                ),
            )
        elif op == 5 and lines:
            s = lines[i]
            lines[i] = s.replace("4", rng.choice(["-1", "0", "0.0", "1.5", "true", "[]", "99999999999999999999"]))
    return "\n".join(lines) + "\n"


def test_fuzzed_policies_are_a_policy_or_a_one_line_error():
    """Every outcome of loading a mutated example is a Policy or a one-line PolicyError, quickly."""
    import pathlib
    import random
    import time

    import yaml

    from lrcompile.policy.rules import Policy

    root = pathlib.Path(__file__).resolve().parents[1]
    seeds = [GOOD] + [p.read_text() for p in sorted((root / "examples" / "policies").glob("*.yaml"))]
    rng = random.Random(1234)
    outcomes = {"policy": 0, "error": 0}
    t0 = time.perf_counter()
    for _ in range(400):
        text = _mutations(rng.choice(seeds), rng)
        t = time.perf_counter()
        try:
            got = load_policy(text)
        except PolicyError as e:
            assert "\n" not in str(e) and len(str(e)) < 500, (text, str(e))
            outcomes["error"] += 1
        else:
            assert got is None or isinstance(got, Policy), text
            outcomes["policy"] += 1
        assert time.perf_counter() - t < 2.0, text
        try:  # a mapping document fed as a dict takes the same checks
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            continue
        if isinstance(data, dict):
            try:
                load_policy(data)
            except PolicyError as e:
                assert "\n" not in str(e), str(e)
    assert outcomes["policy"] > 20 and outcomes["error"] > 100, outcomes
    assert time.perf_counter() - t0 < 60
