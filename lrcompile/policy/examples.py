"""The example policies shipped inside the package (lrcompile/policies/*.yaml), by name."""

from __future__ import annotations

import os

from ..errors import PolicyError

DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "policies")


def names() -> list[str]:
    return sorted(f.removesuffix(".yaml") for f in os.listdir(DIR) if f.endswith(".yaml"))


def path(name: str) -> str:
    """The file of example `name` (with or without `.yaml`)."""
    name = name.removesuffix(".yaml")
    if name not in names():
        raise PolicyError(f"no example policy {name!r}; the examples are: {', '.join(names())}")
    return os.path.join(DIR, f"{name}.yaml")


def summary(name: str) -> str:
    """The example's opening comment, joined into one line."""
    lines = []
    with open(path(name), encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line[1:].strip())
    return " ".join(lines)
