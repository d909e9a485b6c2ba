"""Activation statistics per site, for activation-aware factorisation and rank allocation.

`calibrate(model, batches, policy)` runs the model through Dynamo with a recording backend (capture.Recorder): the
backend's own site enumeration (`find_sites`) on each graph, and a call before each linear site that hands the
site's input rows to the statistics, the graph itself running eagerly. So every site the backend can rewrite —
nn.Linear, HF Conv1D and functional ones (`F.linear(x, self.w)`, `x @ self.P`) — gets statistics under the
backend's name for it. Per site FQN:
  xtx       Σ xᵀx over tokens (in × in; float32 above 1,448 channels): the second moment the whitened objective
            ‖(W−Ŵ)Xᵀ‖ needs — one tensor for the sites fed by one input (q, k, v), and for a wide-input site
            whose rule needs no more, its output moment Σ yᵀy instead (stats.SiteStats, output form);
  abs_mean  mean |x| per input channel (ASVD's channel scale);
  tokens    how many token rows were seen;
  cross     with `reference=` (the dense original): Σ xᵀx̃ between the reference's input x and this model's
            input x̃ at the same site and token (in × in) — `model` is then usually an already compressed copy,
            and factorising against it reproduces the original outputs from the compressed upstream (whiten.py).
Padded positions (attention_mask == 0 in a batch dict) are left out: pad tokens are not the distribution the
model serves, and for right-padded batches they would dominate short sentences.
The statistics also keep the site list itself (`index`: each site's weight path and layout), so that a budget
planned from them (`budget.plan_model`, through `capture.modules.site_weights`) counts the same sites without
another trace.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from .. import compat
from ..capture.trace import Recorder, batch_items, call_model, recording
from ..runtime.memory import release
from .stats import FORMAT, CalibrationStats, SiteStats  # noqa: F401  (the statistics it makes)

# inits whose factorisation needs of the input moment only W C Wᵀ (whitened SVD), |x| (ASVD) or nothing (SVD)
_OUTPUT_FORM_INITS = ("whitened_svd", "asvd", "svd")


def _output_form(policy, fqn: str, out_f: int, in_f: int) -> bool:
    """Keep this site's statistics in output form (E[yᵀy], out × out) instead of XᵀX (in × in): its input is at
    least twice as wide as its output (a Llama down-projection: 2048² instead of 5632² entries) and the policy's
    rule for it needs nothing more (low rank by whitened SVD, ASVD or SVD, no compensation). Without a policy the
    statistics' use is unknown: input form."""
    if policy is None or 2 * out_f > in_f:
        return False
    rule = policy.match(fqn, "linear")
    cfg = getattr(rule, "config", None)
    return (
        getattr(rule, "method", None) == "lowrank"
        and (getattr(cfg, "init", None) or "svd") in _OUTPUT_FORM_INITS
        and not getattr(cfg, "compensate", False)
    )


def _wanted(policy, fqn: str) -> bool:
    rule = policy.match(fqn, "linear")
    return rule is not None and rule.compressing


def _mask_of(batch) -> Optional[torch.Tensor]:
    if isinstance(batch, dict) and batch.get("attention_mask") is not None:
        return batch["attention_mask"]
    return None


def apply_mask(x: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(rows of x at unpadded positions, whether the mask could be applied). A (batch, seq) mask applies to
    inputs shaped (batch, seq, in) or flattened (batch·seq, in); inputs with one row per sequence (a pooler) have
    no padded rows to drop."""
    if mask is None:
        return x, True
    lead = tuple(x.shape[:-1])
    keep = mask.to(x.device) != 0
    if lead == tuple(mask.shape):
        return x[keep], True
    if x.dim() == 2 and x.shape[0] == mask.numel():
        return x[keep.reshape(-1)], True
    if mask.dim() == 2 and x.dim() == 2 and x.shape[0] == mask.shape[0]:
        return x, True
    return x, False


def calibrate(
    model: nn.Module,
    batches: Iterable,
    policy=None,
    *,
    reference: Optional[nn.Module] = None,
    sensitivity_batches: int = 2,
    fisher_probes: int = 2,
    progress: bool = True,
) -> CalibrationStats:
    """Run `batches` (tensors, tuples of args or dicts of kwargs) through `model` and collect statistics.

    The model runs through Dynamo with a recording backend (eval mode, no grad; the frames it compiles are
    thrown away afterwards, as `rewrite`'s are), its graphs eagerly: the sites are the backend's.
    `reference`: the dense original of `model` (e.g. `model` is a compressed copy): each batch also runs through
    it and every site records the cross moment between the reference's and `model`'s inputs (SiteStats.cross),
    sites being matched by name; structures lrcompile installed in `model` count as their sites. A policy whose
    budget says `allocate: sensitivity` also gets each site's measured error curve (`measure_sensitivity`, on
    the first `sensitivity_batches` batches); one with the default `allocate: fisher` gets first-order estimates
    of the same curves from `fisher_probes` backward passes per batch (`fisher.measure_fisher`, every batch)."""
    from ..policy.budget import allocator
    from ..policy.load import load_policy

    pol = load_policy(policy)
    batches = batches if hasattr(batches, "__len__") else list(batches)
    stats = _collect(model, batches, pol, reference, progress)
    release()  # the capture's graphs are gone: their memory back to the system before the curves' passes
    how = allocator(pol.budget) if pol is not None and pol.budget else None
    if how == "sensitivity" and reference is None:
        from .sensitivity import measure_sensitivity

        stats.sensitivity = measure_sensitivity(
            model, list(batches)[: max(1, sensitivity_batches)], stats, pol, progress=progress
        )
    elif how == "fisher" and reference is None:
        from .fisher import measure_fisher

        stats.fisher = measure_fisher(model, batches, stats, pol, probes=fisher_probes, spill=True, progress=progress)
    return stats


def _shapes(batch) -> tuple:
    items = batch_items(batch)
    return tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else repr(t) for t in items)


class _Rows:
    """What the observers share: the batch's mask and the sites it could not be applied at."""

    def __init__(self):
        self.mask = None
        self.unmasked: dict[str, tuple] = {}

    def __call__(self, names: list, x: torch.Tensor) -> torch.Tensor:
        x, ok = apply_mask(x.detach(), self.mask)
        if not ok:
            for n in names:
                self.unmasked.setdefault(n, tuple(x.shape))
        return x


def _collect(model, batches, pol, reference, progress) -> CalibrationStats:
    from tqdm.auto import tqdm

    stats = CalibrationStats()
    rows = _Rows()
    wanted: dict[str, bool] = {}

    def want(names):
        for n in names:
            if n not in wanted:
                wanted[n] = pol is None or _wanted(pol, n)
        return [n for n in names if wanted[n]]

    ref_rows: dict[str, list] = {}  # the reference's rows per site and call, consumed in call order
    ref_known: set = set()
    missing: set = set()
    seen: set = set()  # the model's sites with statistics wanted

    def observe_ref(names, x):
        names = want(names)
        if names:
            r = rows(names, x)
            for n in names:
                ref_known.add(n)
                ref_rows.setdefault(n, []).append(r)

    owners: dict[str, tuple] = {}  # site -> the sites whose statistics it shares (fed by one tensor)

    output: dict[str, Optional[torch.Tensor]] = {}  # site -> its dense weight when kept in output form

    def output_weight(n):
        if n not in output:
            c = rec.sites.get(n)
            w = c.site.dense_weight if c is not None and c.site.weight is not None else None
            output[n] = w if w is not None and _output_form(pol, n, *w.shape) else None
        return output[n]

    def accumulate(names, x64):
        """Sites fed by one tensor (q, k, v; gate, up) share one XᵀX: the same tensors, added to once. A site met
        later in another group gets its own copy first (never double-counted). Sites in output form keep their
        own E[yᵀy]."""
        for n in [n for n in names if output_weight(n) is not None]:
            got = stats.sites.get(n)
            if got is None:
                got = stats.sites[n] = SiteStats.empty_output(x64.shape[-1], output[n].shape[0], x64.device)
            got.add_output(x64, output[n])
        names = [n for n in names if output[n] is None]
        if not names:
            return
        key = tuple(names)
        if any(owners.get(n, key) != key for n in names):
            for m in {m for n in names for m in owners.get(n, (n,))}:
                got = stats.sites.get(m)
                if got is not None and len(owners.get(m, ())) > 1:
                    stats.sites[m] = SiteStats(got.xtx.clone(), got.abs_sum.clone(), got.tokens)
                owners[m] = (m,)
            moments = (x64.T @ x64, x64.abs().sum(0)) if len(names) > 1 else None
            for n in names:
                got = stats.sites.get(n)
                if got is None:
                    got = stats.sites[n] = SiteStats.empty(x64.shape[-1], x64.device)
                got.add(x64, moments=moments)
            return
        head = stats.sites.get(names[0])
        if head is None:
            head = SiteStats.empty(x64.shape[-1], x64.device)
            for n in names:
                stats.sites[n] = head if n == names[0] else SiteStats(head.xtx, head.abs_sum, 0)
                owners[n] = key
        head.add(x64)
        for n in names[1:]:
            stats.sites[n].tokens = head.tokens

    def observe(names, x):
        names = want(names)
        if not names:
            return
        seen.update(names)
        x = rows(names, x)
        x64 = x.reshape(-1, x.shape[-1]).to(torch.float64)
        if reference is None:
            accumulate(names, x64)
            return
        shared = (x64.T @ x64, x64.abs().sum(0)) if len(names) > 1 else None  # one product for q, k and v
        for n in names:
            if n not in ref_known:
                missing.add(n)
                continue
            queue = ref_rows.get(n)
            ref = queue.pop(0) if queue else None
            if ref is None or ref.shape != x.shape:
                raise ValueError(
                    f"lrcompile.calibrate: site {n!r} sees {tuple(x.shape)} in the model but "
                    f"{None if ref is None else tuple(ref.shape)} in the reference"
                )
            s = stats.sites.get(n)
            if s is None:
                s = stats.sites[n] = SiteStats.empty(x.shape[-1], x.device, cross=True)
            s.add(x64, ref, moments=shared)

    # one trace for batches of one shape; dynamic shapes where they differ (a recompile per new shape would be
    # slow, and past Dynamo's recompile limit the frames would run uncompiled, without statistics)
    seq = isinstance(batches, (list, tuple))
    dynamic = (len({_shapes(b) for b in batches}) > 1) if seq else None
    rec = Recorder(model, observe, structures=reference is not None)
    ref_rec = Recorder(reference, observe_ref) if reference is not None else None
    nets = [model] + ([reference] if reference is not None else [])
    # eval mode: dropout would perturb the statistics; restore each module's own mode afterwards
    modes = {m: m.training for net in nets for m in net.modules()}
    for net in nets:
        net.eval()
    try:
        with (
            recording(model, rec, dynamic=dynamic) as compiled,
            (
                recording(reference, ref_rec, dynamic=dynamic) if reference is not None else contextlib.nullcontext()
            ) as ref_compiled,
            compat.fail_on_recompile_limit(),
            torch.no_grad(),
        ):
            total = len(batches) if hasattr(batches, "__len__") else None
            for batch in tqdm(batches, total=total, desc="lrcompile calibrate", disable=not progress):
                rows.mask = _mask_of(batch)
                ref_rows.clear()
                if reference is not None:
                    call_model(ref_compiled, batch)
                before = rec.observed
                call_model(compiled, batch)
                if missing:
                    names = sorted(missing)
                    raise ValueError(
                        f"lrcompile.calibrate: reference has no linear site {names[0]!r} "
                        f"({len(names)} of {len(seen)} sites unmatched)"
                    )
                release()  # the batch's activations and products: returned, not left as heap fragments
                if rec.observed == before and stats.sites:
                    raise RuntimeError(
                        "lrcompile.calibrate: a batch ran without the instrumented graphs (Dynamo "
                        "ran the model uncompiled): its statistics would be missing"
                    )
    except compat.recompile_limit_error() as e:
        raise RuntimeError(
            f"lrcompile.calibrate: Dynamo reached its recompile limit on these batches; past it the "
            f"model would run uncompiled and its statistics be skipped ({e})"
        ) from None
    finally:
        rows.mask = None
        for m, training in modes.items():
            m.training = training
    if rows.unmasked:
        names = sorted(rows.unmasked)
        warnings.warn(
            f"lrcompile.calibrate: attention_mask could not be applied at {len(names)} site(s) "
            f"(e.g. {names[0]} with input rows {rows.unmasked[names[0]]}): their statistics include "
            f"padded positions",
            stacklevel=2,
        )
    # the site list a budget plans over: with `reference=`, the dense reference's (the statistics factorise its
    # weights; the model's installed structures are no sites of it)
    stats.index = _index(reference, ref_rec.sites) if reference is not None else _index(model, rec.sites)
    moved: dict = {}  # shared statistics stay shared on the CPU
    for s in stats.sites.values():
        if s.output_form:
            s.yty, s.abs_sum = s.yty.cpu(), s.abs_sum.cpu()
            continue
        s.xtx = moved.setdefault(id(s.xtx), s.xtx.cpu())
        s.abs_sum = moved.setdefault(id(s.abs_sum), s.abs_sum.cpu())
        if s.cross is not None:
            s.cross = s.cross.cpu()
    return stats


def _index(model: nn.Module, sites: dict) -> dict:
    """The site list for CalibrationStats.index: parameter paths in `model` (a tied weight: its first name)."""
    paths = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        paths.setdefault(id(p), name)
    out = {}
    for fqn, c in sites.items():
        s = c.site
        w = paths.get(id(s.weight))
        if w is None:
            continue  # not the model's own parameter: the budget could not find it again
        out[fqn] = {
            "weight": w,
            "transposed": bool(s.transposed),
            "bias": paths.get(id(s.bias)) if s.bias is not None else None,
        }
    return out
