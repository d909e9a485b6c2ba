"""Rank allocation under a global budget: `budget: {params: F}` or `{flops: F}` in a policy.

F is a fraction of the dense parameters (FLOPs) of the sites that the rules send to a compressing method; a
site's parameters are its weight plus its bias. Low-rank sites get non-uniform ranks chosen to minimise the
summed expected output error: each site's error at rank r is the energy its (whitened) spectrum drops,
Σ_{i>r} σᵢ² of W·L with C = L Lᵀ the mean input second moment — i.e. the mean squared output error per token
(plain spectrum of W without statistics). A greedy Lagrangian walk raises whichever site buys the most error
reduction per unit of budget; a site whose low-rank form saves nothing (or whose remaining error is cheapest to
remove by staying dense) stays dense (rank None). Measured error curves (e.g. end-to-end sensitivity) can
replace the spectra through `errors=`.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import warnings
from typing import Callable, Mapping, Optional, Union

import torch

from . import whiten
from .errors import PlanError

ErrorCurve = Union[Callable[[int], float], Mapping[int, float]]


@dataclasses.dataclass
class Candidate:
    fqn: str
    weight: torch.Tensor  # dense (out, in)
    bias: int = 0  # bias numel
    min_rank: int = 1
    max_rank: Optional[int] = None  # a rule's `rank` caps the allocation under a budget

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


def _costs(kind: str, in_f: int, out_f: int, bias: int):
    if kind == "params":
        return (lambda r: r * (in_f + out_f) + bias), in_f * out_f + bias
    return (lambda r: 2 * r * (in_f + out_f)), 2 * in_f * out_f


def _curve(values: ErrorCurve, full: int) -> Callable[[int], float]:
    """A measured {rank: error} table -> monotone non-increasing error(r), linear between points, 0 at full rank."""
    if callable(values):
        return values
    pts = sorted((int(r), float(e)) for r, e in values.items())
    if not pts or pts[-1][0] < full:
        pts.append((full, 0.0))
    rs = [p[0] for p in pts]
    es = [p[1] for p in pts]
    for i in range(len(es) - 2, -1, -1):  # more rank never costs accuracy: enforce monotonicity
        es[i] = max(es[i], es[i + 1])

    def f(r: int) -> float:
        if r <= rs[0]:
            return es[0]
        if r >= rs[-1]:
            return es[-1]
        j = next(k for k in range(1, len(rs)) if rs[k] >= r)
        t = (r - rs[j - 1]) / (rs[j] - rs[j - 1])
        return es[j - 1] + t * (es[j] - es[j - 1])

    return f


def spectrum_curve(weight: torch.Tensor, stats=None, damping: float = 1e-2) -> Callable[[int], float]:
    """error(r) = Σ_{i>r} σᵢ² of the whitened spectrum (plain spectrum without statistics)."""
    s = whiten.spectrum(weight, stats.cov if stats is not None else None, damping)
    tail = torch.flip(torch.cumsum(torch.flip(s.double() ** 2, [0]), 0), [0]).tolist() + [0.0]  # tail[r] = Σ_{i≥r}
    return lambda r: tail[min(max(r, 0), len(tail) - 1)]


def allocate(candidates: list[Candidate], budget: dict, stats=None, *, step: int = 1,
             errors: Optional[Mapping[str, ErrorCurve]] = None, reserved: tuple[float, float] = (0.0, 0.0),
             damping: float = 1e-2) -> dict[str, Optional[int]]:
    """Ranks per site FQN (None = stay dense) meeting `budget` within one rank step per site.

    `stats`: CalibrationStats (or None) for the whitened spectra; `errors`: measured curves per FQN that replace
    them; `reserved`: (dense, spent) of compressing sites outside this allocation (other families), which count
    toward the same budget.
    """
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in ("params", "flops"):
        raise PlanError(f"budget must be {{params: F}} or {{flops: F}}, got {budget!r}")
    kind, frac = next(iter(budget.items()))
    step = max(1, int(step))
    sites = []
    dense_total = float(reserved[0])
    for c in candidates:
        out_f, in_f = c.shape
        cost, dense = _costs(kind, in_f, out_f, c.bias)
        full = min(in_f, out_f)
        top = min(full, c.max_rank if c.max_rank is not None else full)
        while top >= 1 and cost(top) >= dense:  # ranks at or above break-even save nothing
            top -= 1
        lo = max(1, min(c.min_rank, top)) if top >= 1 else None
        if errors is not None and c.fqn in errors:
            err = _curve(errors[c.fqn], full)
        else:
            err = spectrum_curve(c.weight, stats.get(c.fqn) if stats is not None else None, damping)
        sites.append(dict(fqn=c.fqn, cost=cost, dense=dense, top=top, rank=lo, err=err))
        dense_total += dense
    target = frac * dense_total - float(reserved[1])
    state = {s["fqn"]: (s["rank"] if s["rank"] is not None else None) for s in sites}
    spent = sum(s["cost"](s["rank"]) if s["rank"] is not None else s["dense"] for s in sites)
    if spent > target + 1e-9:
        warnings.warn(f"lrcompile: budget {kind}={frac} is below the minimum rank of every site "
                      f"({spent:.4g} > {target:.4g}); using the minimum ranks", stacklevel=2)
    heap: list = []

    def push(s):
        r = state[s["fqn"]]
        if r is None:
            return  # dense: nothing left to buy
        here = s["err"](r)
        if here <= 0:
            return
        if r + step <= s["top"]:
            dc = s["cost"](r + step) - s["cost"](r)
            gain = here - s["err"](r + step)
            heapq.heappush(heap, (-gain / dc, s["fqn"], r, r + step, dc))
        # staying dense removes the rest of the error (the only move left once the rank reaches break-even)
        dc = s["dense"] - s["cost"](r)
        if dc > 0:
            heapq.heappush(heap, (-here / dc, s["fqn"], r, None, dc))

    by_fqn = {s["fqn"]: s for s in sites}
    for s in sites:
        push(s)
    while heap:
        _, fqn, frm, to, dc = heapq.heappop(heap)
        if state[fqn] != frm:
            continue  # stale move: the site moved since
        if spent + dc > target + 1e-9:
            continue  # does not fit; cheaper moves of other sites may
        state[fqn] = to
        spent += dc
        push(by_fqn[fqn])
    return state


def budget_cost(ranks: dict, candidates: list[Candidate], kind: str = "params") -> tuple[float, float]:
    """(spent, dense) of an allocation, counted as `allocate` counts them."""
    spent = dense_total = 0.0
    for c in candidates:
        out_f, in_f = c.shape
        cost, dense = _costs(kind, in_f, out_f, c.bias)
        r = ranks.get(c.fqn)
        spent += dense if r is None else cost(r)
        dense_total += dense
    return spent, dense_total


def plan_ranks(policy, sites, stats=None, errors=None) -> dict[str, Optional[int]]:
    """Ranks for every low-rank site of a whole model under `policy.budget`.

    `sites`: (fqn, dense weight (out, in), bias or None) for each linear site of the model. Sites of other
    compressing families count toward the budget with their own fixed cost; dense, adapter and below-
    `min_features` sites do not count.
    """
    from .structures import FAMILIES

    kind = next(iter(policy.budget))
    cands, res_dense, res_spent = [], 0.0, 0.0
    for fqn, w, b in sites:
        rule = policy.match(fqn, "linear")
        if rule is None or not rule.compressing:
            continue
        out_f, in_f = w.shape
        min_features = rule.min_features if rule.min_features is not None else policy.defaults.min_features
        if min(in_f, out_f) < min_features:
            continue
        nb = b.numel() if b is not None else 0
        if rule.method == "lowrank":
            from .structures.lowrank import resolve_rank

            cap = resolve_rank(rule.config.rank, in_f, out_f) if rule.config.rank is not None else None
            cands.append(Candidate(fqn, w, nb, 1, cap))
            continue
        cls = FAMILIES[rule.method]
        cfg = rule.config.resolve(in_f, out_f) if hasattr(rule.config, "resolve") else rule.config
        try:
            fixed = (cls.param_count(in_f, out_f, cfg) + nb) if kind == "params" else cls.flops_per_token(in_f, out_f, cfg)
        except Exception as e:
            raise PlanError(f"{policy.where(rule)}: {fqn}: cannot count {rule.method} {kind} for the budget "
                            f"({type(e).__name__}: {e})") from None
        res_dense += (in_f * out_f + nb) if kind == "params" else 2 * in_f * out_f
        res_spent += fixed
    if not cands:
        return {}
    return allocate(cands, policy.budget, stats, errors=errors, reserved=(res_dense, res_spent))


def uniform_ranks(candidates: list[Candidate], budget: dict) -> dict[str, int]:
    """The same parameter (FLOP) fraction at every site: r = ⌊F·in·out/(in+out)⌋ (the baseline to beat)."""
    frac = next(iter(budget.values()))
    return {c.fqn: max(1, math.floor(frac * c.shape[0] * c.shape[1] / (c.shape[0] + c.shape[1]))) for c in candidates}


def plan_model(policy, model, stats=None) -> dict[str, Optional[int]]:
    """`plan_ranks` over every nn.Linear / Conv1D module of `model` (the backend's once-per-session plan)."""
    from .calibrate import module_sites

    return plan_ranks(policy, module_sites(model), stats)
