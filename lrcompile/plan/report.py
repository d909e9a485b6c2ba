"""Per-site report rows: a tabulate table for people and JSON for tools.

The JSON schema is {"sites": [{fqn, kind, method, status, rank, params_before,
params_after, flops_before, flops_after, rel_error, ...}]}; flops are per token (multiply-adds counted twice).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Optional

from tabulate import tabulate

STATUSES = ("rewritten", "installed", "dense", "skipped", "failed")


@dataclasses.dataclass
class SiteRow:
    fqn: str
    kind: str
    method: str
    status: str
    in_features: Optional[int] = None
    out_features: Optional[int] = None
    rank: Optional[int] = None
    params_before: Optional[int] = None
    params_after: Optional[int] = None
    flops_before: Optional[int] = None
    flops_after: Optional[int] = None
    rel_error: Optional[float] = None
    rule: Optional[str] = None
    reason: Optional[str] = None
    notes: list = dataclasses.field(default_factory=list)
    seconds: Optional[float] = None
    allocated_rank: Optional[int] = None  # rank given by the policy budget (lrcompile.budget)
    svd: Optional[str] = None  # truncated-SVD algorithm that made the factors: exact | randomized (lrcompile.svd)
    kept_energy: Optional[float] = None  # fraction of the (whitened) spectrum's energy the rank keeps
    weighted_error: Optional[float] = None  # ‖(W−Ŵ)Xᵀ‖/‖W Xᵀ‖ on the calibration activations
    impl: Optional[str] = None  # implementation the autotuner chose (lrcompile.tune); the note says why
    tuned_ms: Optional[float] = None  # its median time at the site's token bucket
    dense_ms: Optional[float] = None  # the original dense layer's, measured beside it (compressing families)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if v not in (None, [])} | {"fqn": self.fqn, "status": self.status}


class Report:
    """Rows keyed by site FQN, accumulated over every subgraph (a later row for the same site replaces it)."""

    def __init__(self):
        self.rows: dict[str, SiteRow] = {}

    def add(self, row: SiteRow) -> None:
        assert row.status in STATUSES, row.status
        self.rows[(row.kind, row.fqn)] = row

    def sites(self) -> list[SiteRow]:
        return list(self.rows.values())

    def as_json(self) -> dict:
        rows = self.sites()
        lin = [r for r in rows if r.kind == "linear" and r.params_before]
        before = sum(r.params_before for r in lin)
        after = sum(r.params_after if r.params_after is not None else r.params_before for r in lin)
        return {
            "sites": [r.as_dict() for r in rows],
            "summary": {
                "linear_sites": len(lin),
                "params_before": before,
                "params_after": after,
                "rewritten": sum(r.status == "rewritten" for r in rows),
            },
        }

    def write(self, path: str) -> None:
        """Atomic write: a reader never sees half a report."""
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".report-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.as_json(), f, indent=1)
        os.replace(tmp, path)

    def table(self) -> str:
        return format_table(self.as_json())


def format_table(report: dict) -> str:
    headers = ["site", "kind", "method", "status", "shape", "rank", "params", "flops/tok", "rel_err", "note"]
    body = []
    for r in report["sites"]:
        shape = f"{r['in_features']}→{r['out_features']}" if r.get("in_features") else ""
        params = _ratio(r.get("params_before"), r.get("params_after"))
        flops = _ratio(r.get("flops_before"), r.get("flops_after"))
        err = f"{r['rel_error']:.3g}" if r.get("rel_error") is not None else ""
        note = "; ".join(filter(None, [r.get("reason"), *r.get("notes", [])]))
        body.append(
            [
                r["fqn"] or "<root>",
                r["kind"],
                r["method"],
                r["status"],
                shape,
                r.get("rank", ""),
                params,
                flops,
                err,
                note,
            ]
        )
    s = report.get("summary")
    out = tabulate(body, headers=headers)
    if s and s["params_before"]:
        out += (
            f"\n{s['rewritten']} sites rewritten; linear parameters {s['params_before']:,} → {s['params_after']:,}"
            f" ({s['params_after'] / s['params_before']:.1%})"
        )
    return out


def _ratio(before, after) -> str:
    if before is None:
        return ""
    if after is None or after == before:
        return f"{before:,}"
    return f"{before:,}→{after:,}"
