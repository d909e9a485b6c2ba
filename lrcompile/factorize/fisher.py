"""First-order (Fisher) end-to-end error curves: every rank of every site from a few backward passes.

The loss is the sensitivity curves' (and heal's): 1 − cosine of the mask-weighted mean-pooled outputs against the
dense model's. At the dense model it is 0 with zero gradient, and its Hessian in a sentence's pooled output e is
H = (I − êêᵀ)/‖e‖²; truncating a site (Δ = W − Ŵ_r) raises it by ≈ ½ Σ_s δe_sᵀ H δe_s with δe_s = J_s Δ
(Gauss-Newton: the model linearised in the site's weight). Probes z_s ~ N(0, H), one per sentence, and
g = ∇_W Σ_s ⟨z_s, e_s⟩ (one backward pass for every site at once) give E[⟨Δ, g⟩²] = Σ_s δe_sᵀ H δe_s (the
sentences' cross terms have mean 0). With the site's init as an SVD, W ≈ P·diag(S)·R, every rank follows from the
same gradient: ⟨Δ_r, g⟩ = ⟨W, g⟩ − Σ_{i<r} S_i·p_iᵀ g r_i.
Unlike the whitened spectrum (the error at the site's own output) this weighs each site by how much its output
matters at the model's output; unlike measured sensitivity it costs a few backward passes for all sites together,
not forward passes per site and rank. Sites are taken alone (the allocator adds their errors), as measured
curves take them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..capture.trace import batch_items, call_model
from ..runtime.memory import release
from . import whiten
from .sensitivity import _site_init, _site_weights, site_svd
from .spill import Parked, Spill, load
from .stats import CalibrationStats
from .whiten import FLOAT32_ABOVE

PROBES = 2  # backward passes per batch: more cut the estimate's noise (relative spread ≈ √(2 / probes·batches))
# ...and at least this many in all: on MiniLM (3 calibration batches, selection split) 6 / 24 / 96 probes in all
# gave 0.764 / 0.793 / 0.800 mean cosine at 50% parameters (0.937 / 0.939 / 0.939 at 75%)
MIN_PROBES = 16


def _pooled(out, batch) -> torch.Tensor:
    """(sentences, features) of the loss: the mask-weighted mean over tokens of the model's output."""
    from ..lifecycle.heal import _hidden, _mask, _pool

    h = _hidden(out)
    e = _pool(h, _mask(batch, h)) if h.dim() >= 3 else h
    return e.reshape(-1, e.shape[-1]) if e.dim() != 2 else e


def _probe(e: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """z ~ N(0, (I − êêᵀ)/‖e‖²) per row: the Hessian of 1 − cos(·, e) at e."""
    e = e.detach().double()
    n = e.norm(dim=-1, keepdim=True)
    u = e / n.clamp_min(1e-300)
    xi = torch.randn(e.shape, generator=gen, dtype=torch.float64)
    z = (xi - u * (u * xi).sum(-1, keepdim=True)) / n.clamp_min(1e-300)
    return torch.where(n > 0, z, torch.zeros_like(z))


def measure_fisher(
    model: nn.Module,
    batches,
    stats: CalibrationStats,
    policy=None,
    *,
    probes: int = PROBES,
    seed: int = 0,
    max_bytes: Optional[int] = None,
    spill: bool = False,
    progress: bool = True,
) -> dict[str, dict[int, float]]:
    """{fqn: {rank: predicted loss increase}} for ranks 1 … break-even of each low-rank site with statistics (the
    policy's rules say which sites and with which init; without a policy every site, whitened SVD). `probes`
    backward passes per batch, more where the batches are few (MIN_PROBES in all).

    `max_bytes`: the bases kept at once (default: a quarter of the sites' own weights, so that calibration stays
    well under twice the model's memory); more sites than that are done in groups of consecutive sites, each with
    its own backward passes (which stop at the group's first site). `spill`: every basis goes to disk instead
    (spill.py) and the passes read each site's as they reach it, so all sites share one set of passes and hold no
    basis between them; the whitened ones then serve the factorisation (`rewrite` does not decompose them again).
    Without room on disk it falls back to groups."""
    from tqdm.auto import tqdm

    from ..policy.load import load_policy

    pol = load_policy(policy)
    batches = list(batches)
    if not batches:
        raise ValueError("lrcompile: Fisher curves need at least one calibration batch")
    probes = max(int(probes), -(-MIN_PROBES // len(batches)))
    params = {
        f: pw
        for f, pw in _site_weights(model, stats, batches[0]).items()
        if pol is None or getattr(pol.match(f, "linear"), "method", None) == "lowrank"
    }
    if max_bytes is None:
        max_bytes = sum(w.numel() * w.element_size() for w, _ in params.values()) // 4
    spill = Spill(sum(w.numel() * w.element_size() for w, _ in params.values())) if spill else None
    if spill is not None and spill.dir is not None:
        stats.spill = spill  # lives (and its directory with it) as long as the statistics
        groups = [list(params)]  # bases on disk, read by the hooks as the passes reach each site: one group
    else:
        spill, groups, size = None, [[]], 0
        for f, (w, conv) in params.items():
            out_f, in_f = (w.T if conv else w).shape
            # a module site with a projection basis (whitened, out ≤ in) keeps only A (out × k) during the passes
            rows_only = out_f <= in_f and _module_of(model, f, w, conv) is not None
            elt = 8 if w.numel() <= FLOAT32_ABOVE else 4
            need = ((0 if rows_only else in_f) + out_f) * _top(out_f, in_f) * elt
            if groups[-1] and size + need > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(f)
            size += need
    grad_was = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    curves = {}
    # spilled: a step per site decomposed, then per batch passed; else per site, as each group completes
    bar = tqdm(total=len(params) + (len(batches) if spill else 0), desc="lrcompile fisher", disable=not progress)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for group in groups:
            part = {f: params[f] for f in group}
            curves.update(_group(model, batches, stats, pol, part, probes, seed, spill, bar))
    finally:
        bar.close()
        for p, g in grad_was.items():
            p.requires_grad_(g)
            p.grad = None
        for mod, training in modes.items():
            mod.training = training
    return curves


def _top(out_f: int, in_f: int) -> int:
    """The break-even rank: no budget gives a low-rank site more (it would cost at least its dense weight)."""
    return max(1, min(out_f, in_f, (in_f * out_f) // (in_f + out_f)))


def _basis(W: torch.Tensor, s, pol, fqn: str):
    """(A, B, projection, energy): W = Σᵢ A[:, i]·B[i] with A[:, :r]·B[:r] the site's rank-r init; projection: A
    has orthonormal columns and B = AᵀW (whitened SVD of a site no wider out than in); energy: the whitened
    spectrum (None for other inits)."""
    init, damping, alpha = _site_init(pol, fqn)
    if init == "whitened_svd" and s is not None:
        b = whiten.whitened_basis(W, s, damping)
        return b.A, b.B, b.projection, b.energy
    P, S, R = site_svd(W, s, init, damping, alpha)
    return P * S, R, False, None


def _module_of(model: nn.Module, fqn: str, weight: torch.Tensor, conv: bool) -> Optional[nn.Module]:
    """The nn.Linear / HF Conv1D whose call is this site (its output is the site's), or None (functional)."""
    try:
        m = model.get_submodule(fqn)
    except AttributeError:
        return None
    if getattr(m, "weight", None) is not weight:
        return None
    ok = isinstance(m, nn.Linear) if not conv else type(m).__name__ == "Conv1D"
    return m if ok else None


def _token_hook(fqn: str, basis, sums: dict):
    """Forward hook of a module site: a_i = Σ_t (A_iᵀ gy_t)(B_i x_t) from the call's rows and its output's gradient
    (B_i x_t = A_iᵀ (y_t − b) for a projection basis, B = None), ⟨W, g⟩ = Σ_t gy_t·(y_t − b): per probe
    O(tokens·k·(out + in)) instead of the k·out·in of projecting the weight's gradient. `basis()` gives (A, B)."""

    def hook(mod, inp, out):
        if not out.requires_grad:
            return
        A, B = basis()
        y = out.detach()
        if getattr(mod, "bias", None) is not None:
            y = y - mod.bias.detach()
        y = y.reshape(-1, y.shape[-1]).to(A.dtype)
        bx = y @ A if B is None else inp[0].detach().reshape(-1, B.shape[1]).to(A.dtype) @ B.T
        del A, B

        def on_grad(gy):
            A = basis(False)[0]
            g = gy.detach().reshape(-1, gy.shape[-1]).to(A.dtype)
            a = ((g @ A) * bx).sum(0).double()
            total = float((g * y).sum())
            cur = sums.get(fqn)
            sums[fqn] = (total, a) if cur is None else (cur[0] + total, cur[1] + a)

        out.register_hook(on_grad)

    return hook


def _grad_entry(model: nn.Module, batch):
    """Where the passes start gradients so that the sites' outputs carry them without any weight gradient being
    computed (a third of a backward pass): the input embeddings (an HF model), "inputs" (the batch's floating-point
    tensors), or None (then the sites' weights require grad, their gradients dropped). A site off that path gets
    no curve (and the allocation says so)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if isinstance(emb, nn.Module):
        return emb
    items = batch_items(batch)
    if any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in items):
        return "inputs"
    return None


def _inputs_with_grad(batch):
    def grad(t):
        return t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    if isinstance(batch, dict):
        return {k: grad(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(grad(t) for t in batch)
    return grad(batch)


def _source(ref=None, A=None, B=None):
    """() -> (A, B): read from disk at each call (spilled) or held in memory."""
    if ref is not None:
        return lambda with_b=True: load(ref, with_b)
    return lambda with_b=True: (A, B)


def _group(model, batches, stats, pol, params: dict, probes: int, seed: int, spill=None, bar=None):
    """Curves of one group of sites: module sites by their calls' rows and output gradients (`_token_hook`),
    functional ones by their weight's gradient. `spill`: each basis goes to disk (the whitened ones also serve
    the factorisation) and is read back as the passes need it; else the group's bases are held in memory."""
    by_param: dict = {}  # functional sites: parameter -> [(fqn, basis, conv, W)]
    rows: dict[str, list] = {f: [] for f in params}  # per probe: (scale, ⟨W, g⟩, a_0 … a_{k−1})
    sums: dict = {}  # module sites: (⟨W, g⟩, a) of the current backward pass, summed over the site's calls
    handles, needs_grad = [], set()
    for fqn, (weight, conv) in params.items():
        W = (weight.T if conv else weight).detach()
        A, B, projection, energy = _basis(W, stats.get(fqn), pol, fqn)
        k = min(_top(*W.shape), A.shape[1])
        mod = _module_of(model, fqn, weight, conv)
        ref = None
        if spill is not None:
            zeros = torch.zeros(A.shape[1], dtype=torch.float64)
            ref = spill.put(W, _site_init(pol, fqn)[1], A, B, energy if energy is not None else zeros, k, projection)
            if energy is not None and ref is not None:
                stats.get(fqn).spilled = ref  # the factorisation's too
        if ref is not None:
            basis = _source(ref)
        else:  # held in memory (no spill directory, or it could not take this one)
            basis = _source(None, A[:, :k].contiguous(), None if projection else B[:k].contiguous())
        del A, B
        release()  # the decomposition's buffers differ in size site to site: unreturned, they fragment the heap
        if mod is not None:
            handles.append(mod.register_forward_hook(_token_hook(fqn, basis, sums)))
        else:
            by_param.setdefault(weight, []).append((fqn, basis, conv))
        if mod is None:
            needs_grad.add(weight)  # the projected weight gradient is the functional site's curve
        if bar is not None:
            bar.update(1)
    scale = [1.0]

    def consume(p: torch.Tensor) -> None:
        g = p.grad.detach()
        p.grad = None
        for fqn, basis, conv in by_param.get(p, ()):
            A, B = basis()
            if B is None:  # projection basis: B = AᵀW
                B = A.T @ (p.T if conv else p).detach().to(A.dtype)
            G = (g.T if conv else g).to(A.dtype)
            total = float((p.detach().double() * g.double()).sum())
            a = ((A.T @ G) * B).sum(1).double()
            rows[fqn].append((scale[0], total, a))

    gen = torch.Generator().manual_seed(seed)
    parked = Parked(spill, stats)  # the moments wait on disk while the passes run (nothing reads them then)
    entry = _grad_entry(model, batches[0])
    if entry is None:  # nothing upstream to start gradients from: the module sites' weights carry them
        needs_grad.update(w for w, _ in params.values())
    try:
        for p in needs_grad:
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(consume))
        if isinstance(entry, nn.Module):
            handles.append(entry.register_forward_hook(lambda mod, inp, out: out.detach().requires_grad_()))
        for batch in batches:
            e = _pooled(call_model(model, _inputs_with_grad(batch) if entry == "inputs" else batch), batch)
            z = _probe(e, gen)
            scale[0] = 1.0 / (2 * e.shape[0])  # ½ per sentence: the mean loss increase over the batch
            for k in range(probes):
                if k:
                    z = _probe(e, gen)
                sums.clear()
                (e.double() * z).sum().backward(retain_graph=k + 1 < probes)
                for fqn, (total, a) in sums.items():
                    rows[fqn].append((scale[0], total, a))
                release()  # each pass's gradients, differently sized site to site
            del e, z
            if bar is not None and spill is not None:
                bar.update(1)
    finally:
        for h in handles:
            h.remove()
        for p in needs_grad:
            p.requires_grad_(False)
            p.grad = None
        parked.restore()
    if bar is not None and spill is None:
        bar.update(len(params))
    out = {}
    for fqn, got in rows.items():
        if not got:
            continue  # the site's weight got no gradient (not on the path to the output)
        d = torch.stack([t - torch.cat([a.new_zeros(1), torch.cumsum(a, 0)]) for _, t, a in got])  # ⟨Δ_r, g⟩
        w = torch.tensor([c for c, _, _ in got], dtype=torch.float64)
        err = (w[:, None] * d.square()).mean(0)
        out[fqn] = {r: float(err[r]) for r in range(1, err.numel())}
    return out
