"""Rank allocation under a global budget: `budget: {params: F}` or `{flops: F}` in a policy.

F is a fraction of the dense parameters (FLOPs) of the sites that the rules send to a compressing method; a
site's parameters are its weight plus its bias. Low-rank sites get non-uniform ranks chosen to minimise the
summed expected output error: each site's error at rank r is the energy its (whitened) spectrum drops,
Σ_{i>r} σᵢ² of W·L with C = L Lᵀ the mean input second moment — i.e. the mean squared output error per token
(plain spectrum of W without statistics). The allocation is a multiple-choice knapsack solved on each site's
lower convex hull of (cost, error) options — its ranks and staying dense — then filled step by step (`allocate`);
a site whose low-rank form saves nothing stays dense (rank None), and so does one whose remaining error is
cheapest to remove that way. Measured error curves (e.g. end-to-end sensitivity) can replace the spectra through
`errors=`.

The allocator knows families only through what they declare (`Structure.budget_knob`, `budget_max`,
`budget_cost`, `budget_error`): "rank" above is whatever knob the family sizes by, and any family with an error
model (lowrank's spectrum, BTT's blockwise spectra) is allocated jointly with the others. A family with a knob
but no error model (BLAST) gets F of its own dense cost at each site; one without a knob counts at the fixed cost
its rule gives.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import warnings
from typing import Callable, Mapping, Optional, Union

import torch

from ..errors import PlanError, SiteError

ErrorCurve = Union[Callable[[int], float], Mapping[int, float]]


@dataclasses.dataclass
class Candidate:
    fqn: str
    weight: torch.Tensor  # dense (out, in)
    bias: int = 0  # bias numel
    min_rank: int = 1
    max_rank: Optional[int] = None  # a rule's knob value (`rank`) caps the allocation under a budget
    family: str = "lowrank"  # whose knob is allocated: the family prices it, bounds it and models its error
    config: Optional[object] = None  # the rule's config (knob unset, or the cap); None: the family's defaults

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def family_config(self):
        from ..families import FAMILIES

        cls = FAMILIES[self.family]
        return cls, (self.config if self.config is not None else cls.Config())

    def full(self) -> int:
        """The largest knob value that changes anything here."""
        cls, cfg = self.family_config()
        out_f, in_f = self.shape
        return cls.budget_max(in_f, out_f, cfg)


def _costs(c: Candidate, kind: str):
    """(cost(k), dense cost) of a site: its family's price of knob value k, plus the bias for parameters."""
    cls, cfg = c.family_config()
    out_f, in_f = c.shape
    price = cls.budget_cost(in_f, out_f, cfg, kind)
    if kind == "params":
        return (lambda r: price(r) + c.bias), in_f * out_f + c.bias
    return price, 2 * in_f * out_f


def _largest(ok: Callable[[int], bool], top: int) -> int:
    """The largest k in [1, top] with ok(k), for an `ok` that holds up to some k and fails after it; 0 if none
    (bisection: costs are priced through the family, for every site)."""
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _curve(values: ErrorCurve, full: int) -> tuple[Callable[[int], float], int]:
    """(error(r), first rank it knows). A measured {rank: error} table is made non-increasing (more rank never
    costs accuracy), interpolated linearly between its points and ends at 0 at full rank; ranks below its first
    point are unknown (not offered: a flat extrapolation would make them look free)."""
    if callable(values):
        return values, 1
    pts = sorted((int(r), float(e)) for r, e in values.items())
    if not pts:
        raise PlanError("budget: an empty measured error curve")
    if pts[-1][0] < full:
        pts.append((full, 0.0))
    rs = [p[0] for p in pts]
    es = [p[1] for p in pts]
    for i in range(len(es) - 2, -1, -1):
        es[i] = max(es[i], es[i + 1])

    def f(r: int) -> float:
        if r >= rs[-1]:
            return es[-1]
        j = bisect.bisect_left(rs, r)
        if rs[j] == r or j == 0:
            return es[j]
        t = (r - rs[j - 1]) / (rs[j] - rs[j - 1])
        return es[j - 1] + t * (es[j] - es[j - 1])

    return f, max(1, rs[0])


def _hull(opts: list[tuple[float, float]]) -> list[int]:
    """Indices of the lower convex hull of (cost, error) points sorted by cost, from the first to the last: the
    only options a Lagrangian (error + μ·cost) can pick, in order of falling error per unit of cost."""
    keep: list[int] = []
    for i, (c, e) in enumerate(opts):
        while len(keep) >= 2:
            (c1, e1), (c2, e2) = opts[keep[-2]], opts[keep[-1]]
            # keep[-1] lies above the chord: not on the hull. Points on it stay: a straight stretch of a curve is
            # then bought a step at a time, not as one long segment that may not fit while worse ones do
            if (e2 - e1) * (c - c1) > (e - e1) * (c2 - c1):
                keep.pop()
            else:
                break
        keep.append(i)
    return keep


def _options(c: Candidate, kind: str, step: int, err: Callable[[int], float], first: int):
    """A site's choices [(cost, error, rank or None=dense)] by cost; () when low rank saves nothing."""
    cost, dense = _costs(c, kind)
    full = c.full()
    top = min(full, c.max_rank if c.max_rank is not None else full)
    top = _largest(lambda r: cost(r) < dense, top)  # ranks at or above break-even save nothing
    if top < 1:
        return (), dense
    lo = min(max(1, c.min_rank, first), top)
    opts = [(float(cost(r)), float(err(r)), r) for r in range(lo, top + 1, step)]
    if c.max_rank is None or cost(c.max_rank) >= dense:  # a rule's rank cap below break-even forbids dense
        opts.append((float(dense), 0.0, None))
    for i in range(len(opts) - 2, -1, -1):  # monotone: error never rises with cost
        opts[i] = (opts[i][0], max(opts[i][1], opts[i + 1][1]), opts[i][2])
    return opts, dense


def allocate(
    candidates: list[Candidate],
    budget: dict,
    stats=None,
    *,
    step: int = 1,
    errors: Optional[Mapping[str, ErrorCurve]] = None,
    reserved: tuple[float, float] = (0.0, 0.0),
    damping: float = 1e-2,
) -> dict[str, Optional[int]]:
    """Ranks per site FQN (None = stay dense) meeting `budget` within one rank step per site.

    Minimises Σ error over sites subject to Σ cost ≤ F·dense: each site starts at its lowest rank, then
    (1) segments of every site's lower convex hull of (cost, error) options (ranks and dense) are bought in order
    of error removed per unit of cost while they fit — the Lagrangian optimum at the budget; (2) what is left is
    filled one option at a time, best ratio first, until no site's next step fits.
    `stats`: CalibrationStats (or None) for the whitened spectra; `errors`: measured curves per FQN that replace
    them; `reserved`: (dense, spent) of compressing sites outside this allocation (other families), which count
    toward the same budget; `damping`: the whitening damping of candidates without a config.
    """
    kind, frac = _check_budget(budget)
    step = max(1, int(step))
    sites, state = [], {}
    dense_total, spent = float(reserved[0]), 0.0
    for c in candidates:
        if errors is not None and c.fqn in errors:
            err, first = _curve(errors[c.fqn], c.full())
        else:
            err, first = _family_curve(c, stats, damping), 1
        opts, dense = _options(c, kind, step, err, first)
        dense_total += dense
        if not opts:
            state[c.fqn] = None  # low rank saves nothing here: dense, at its dense cost
            spent += dense
            continue
        sites.append(dict(fqn=c.fqn, opts=opts, hull=_hull([(o[0], o[1]) for o in opts]), at=0, h=0))
        spent += opts[0][0]
    target = frac * dense_total - float(reserved[1])
    if spent > target + 1e-9:
        warnings.warn(
            f"lrcompile: budget {kind}={frac} is below the minimum rank of every site "
            f"({spent:.4g} > {target:.4g}); using the minimum ranks",
            stacklevel=2,
        )

    def ratio(s, j):
        (c0, e0, _), (c1, e1, _) = s["opts"][s["at"]], s["opts"][j]
        return (e0 - e1) / (c1 - c0)

    # (1) hull segments, best first; a segment that does not fit ends its site's walk (later ones depend on it),
    # and so does one that removes nothing (a site exact at this size, up to rounding): bought here it would
    # take the budget from the fill below, where it comes last
    heap = [(-ratio(s, s["hull"][1]), i) for i, s in enumerate(sites) if len(s["hull"]) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        s = sites[i]
        j = s["hull"][s["h"] + 1]
        dc = s["opts"][j][0] - s["opts"][s["at"]][0]
        if spent + dc > target + 1e-9 or s["opts"][s["at"]][1] - s["opts"][j][1] <= 1e-9 * s["opts"][0][1]:
            continue
        spent += dc
        s["at"], s["h"] = j, s["h"] + 1
        if s["h"] + 1 < len(s["hull"]):
            heapq.heappush(heap, (-ratio(s, s["hull"][s["h"] + 1]), i))
    # (2) fill the remainder with single steps (between hull vertices, or those cut short above)
    heap = [(-ratio(s, s["at"] + 1), i) for i, s in enumerate(sites) if s["at"] + 1 < len(s["opts"])]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        s = sites[i]
        dc = s["opts"][s["at"] + 1][0] - s["opts"][s["at"]][0]
        if spent + dc > target + 1e-9:
            continue  # later steps of this site cost at least as much per step: it is done
        spent += dc
        s["at"] += 1
        if s["at"] + 1 < len(s["opts"]):
            heapq.heappush(heap, (-ratio(s, s["at"] + 1), i))
    for s in sites:
        state[s["fqn"]] = s["opts"][s["at"]][2]
    return state


def _family_curve(c: Candidate, stats, damping: float) -> Callable[[int], float]:
    cls, cfg = c.family_config()
    if cls.budget_error is None:
        raise PlanError(f"budget: {c.fqn}: {c.family} has no error model to allocate by (size it with uniform_ranks)")
    if c.config is None and "damping" in {f.name for f in dataclasses.fields(cfg)}:
        cfg = dataclasses.replace(cfg, damping=damping)
    return cls.budget_error(c.weight, stats.get(c.fqn) if stats is not None else None, cfg)


# the first is the default: first-order end-to-end curves (factorize/fisher.py) beat both the whitened spectra and
# uniform ranks on pretrained MiniLM, near measured sensitivity, for a few backward passes
ALLOCATORS = ("fisher", "spectrum", "sensitivity")


def allocator(budget: dict) -> str:
    """What a budget allocates by: its `allocate`, else the default."""
    return budget.get("allocate", ALLOCATORS[0])


def _check_budget(budget) -> tuple[str, float]:
    """(kind, F) of `{params|flops: F[, allocate: fisher|spectrum|sensitivity]}`."""
    kinds = [k for k in (budget if isinstance(budget, dict) else ()) if k in ("params", "flops")]
    if (
        not isinstance(budget, dict)
        or len(kinds) != 1
        or set(budget) - {kinds[0], "allocate"}
        or allocator(budget) not in ALLOCATORS
    ):
        raise PlanError(
            f"budget must be {{params: F}} or {{flops: F}} (optionally allocate: {' | '.join(ALLOCATORS)}), "
            f"got {budget!r}"
        )
    return kinds[0], budget[kinds[0]]


def budget_cost(ranks: dict, candidates: list[Candidate], kind: str = "params") -> tuple[float, float]:
    """(spent, dense) of an allocation, counted as `allocate` counts them."""
    spent = dense_total = 0.0
    for c in candidates:
        cost, dense = _costs(c, kind)
        r = ranks.get(c.fqn)
        spent += dense if r is None else cost(r)
        dense_total += dense
    return spent, dense_total


def _cannot_take(policy, rule, fqn: str, in_f: int, out_f: int, e: Exception) -> None:
    """A shape the rule's family cannot take: the site stays out of the budget and dense (the planner's `decide`
    reports it failed); under `strict` it is an error, as every failed site is."""
    msg = f"{policy.where(rule)}: {fqn}: {rule.method} cannot take {in_f}→{out_f} ({str(e).splitlines()[0]})"
    if policy.defaults.strict:
        raise SiteError(msg)
    warnings.warn(f"lrcompile: {msg}; left out of the budget, kept dense", stacklevel=3)


def plan_ranks(policy, sites, stats=None, errors=None) -> dict[str, Optional[int]]:
    """Knob values (ranks) for every site of a whole model whose family a budget sizes, under `policy.budget`.

    `sites`: (fqn, dense weight (out, in), bias or None) for each linear site of the model. Families with an
    error model are allocated jointly (`allocate`), those without one get the budget's fraction of each site
    (`uniform_ranks`); a rule's own knob value caps either. Compressing families without a knob count toward the
    budget with their own fixed cost; dense, adapter and below-`min_features` sites do not count.
    """
    from ..families import FAMILIES

    kind, _ = _check_budget(policy.budget)
    how = allocator(policy.budget)
    if errors is None and how == "fisher":
        errors = getattr(stats, "fisher", None) or None
    if errors is None and how == "sensitivity":
        errors = getattr(stats, "sensitivity", None)
        if not errors:
            raise PlanError(
                f"{policy.source}: budget allocate: sensitivity needs calibration statistics with "
                f"sensitivity curves: lrcompile.calibrate(model, batches, policy) with this policy"
            )
    cands, uniform, res_dense, res_spent = [], [], 0.0, 0.0
    for fqn, w, b in sites:
        rule = policy.match(fqn, "linear")
        if rule is None or not rule.compressing:
            continue
        out_f, in_f = w.shape
        min_features = rule.min_features if rule.min_features is not None else policy.defaults.min_features
        if min(in_f, out_f) < min_features:
            continue
        nb = b.numel() if b is not None else 0
        cls = FAMILIES[rule.method]
        knob = cls.budget_knob
        if knob is not None:
            try:
                given = getattr(rule.config, knob) is not None  # a cap, resolved as the family resolves it
                cap = getattr(rule.config.resolve(in_f, out_f), knob) if given else None
                cand = Candidate(fqn, w, nb, 1, cap, rule.method, rule.config)
                cand.full()
                _costs(cand, kind)[0](1)  # the smallest size priced: a shape the family cannot take fails here
            except (ValueError, TypeError, ZeroDivisionError) as e:
                _cannot_take(policy, rule, fqn, in_f, out_f, e)
                continue
            (cands if cls.budget_error is not None else uniform).append(cand)
            continue
        try:
            cfg = rule.config.resolve(in_f, out_f) if hasattr(rule.config, "resolve") else rule.config
            fixed = (
                (cls.param_count(in_f, out_f, cfg) + nb) if kind == "params" else cls.flops_per_token(in_f, out_f, cfg)
            )
        except (ValueError, TypeError, ZeroDivisionError) as e:
            _cannot_take(policy, rule, fqn, in_f, out_f, e)
            continue
        res_dense += (in_f * out_f + nb) if kind == "params" else 2 * in_f * out_f
        res_spent += fixed
    budget = {kind: policy.budget[kind]}
    out = uniform_ranks(uniform, budget) if uniform else {}
    if uniform:  # what they take counts toward the same budget as the fixed-cost sites
        spent, dense = budget_cost(out, uniform, kind)
        res_dense, res_spent = res_dense + dense, res_spent + spent
    if cands and how == "fisher" and (errors is None or any(c.fqn not in errors for c in cands)):
        return {**out, **_without_curves(policy, cands, budget, stats, errors)}
    if cands:  # each candidate carries its rule's config: its own whitening damping
        out.update(allocate(cands, budget, stats, errors=errors, reserved=(res_dense, res_spent)))
    return out


def _without_curves(policy, cands, budget, stats, errors) -> dict[str, Optional[int]]:
    """The default allocation where its first-order curves are missing: uniform ranks. Neither spectrum is a safe
    stand-in on pretrained MiniLM (plain spectra with plain SVD and whitened spectra with whitened SVD both fell
    below uniform ranks at 50%). Without statistics that is the documented behaviour; statistics without the
    curves (calibrated without this policy, or sites of other families, which have none) get a warning."""
    if stats is not None:
        missing = [c.fqn for c in cands if not errors or c.fqn not in errors]
        warnings.warn(
            f"lrcompile: {policy.source}: budget allocate: fisher has no curves for {len(missing)} site(s) (e.g. "
            f"{missing[0]}): calibrate with this policy (lrcompile.calibrate(model, batches, policy)) to get them; "
            f"uniform ranks meanwhile",
            stacklevel=4,
        )
    return uniform_ranks(cands, budget)


def uniform_ranks(candidates: list[Candidate], budget: dict) -> dict[str, Optional[int]]:
    """The same fraction F at every site (the baseline to beat, and the sizing of families without an error
    model): the largest r whose cost fits F of the site's dense cost — low rank: r(in+out)+b ≤ F(in·out+b), FLOPs
    2r(in+out) ≤ F·2·in·out — within the site's rank bounds; dense (None) where that saves nothing."""
    kind, frac = _check_budget(budget)
    out = {}
    for c in candidates:
        cost, dense = _costs(c, kind)
        target = frac * dense
        r = _largest(lambda k, cost=cost, target=target: cost(k) <= target + 1e-9 * max(1.0, abs(target)), c.full())
        r = min(r, c.max_rank if c.max_rank is not None else r)
        r = max(r, c.min_rank, 1)
        out[c.fqn] = None if cost(r) >= dense else r
    return out


def plan_model(
    policy, model, stats=None, errors=None, *, example_inputs=None, sites=None, nested: bool = False
) -> dict[str, Optional[int]]:
    """`plan_ranks` over every linear site of `model` as the backend enumerates and names them — nn.Linear, Conv1D
    and functional sites: the one site list that the backend (once per session), `rewrite` and `calibrate` share,
    so all give the same ranks. `sites`: the sites already captured (Site objects, e.g. `rewrite`'s); else the
    list `calibrate` recorded in `stats`, else a trace of `model(example_inputs)` (capture.modules.site_weights)."""
    from ..capture.modules import site_weights
    from ..capture.trace import linear_sites

    if sites is not None:
        listed = [(s.fqn, s.dense_weight, s.bias) for s in linear_sites(sites)]
    else:
        listed = site_weights(model, example_inputs, stats, nested=nested)
    return plan_ranks(policy, listed, stats, errors)
