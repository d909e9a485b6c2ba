"""`lrcompile compress`: a local Hugging Face model + a file of sentences -> a compressed, saved model.

Steps: read the sentences (untrusted: bounded, UTF-8), keep a held-out part aside, calibrate on the rest, compress
every linear of the model's repeated blocks with whitened SVD to a global parameter budget (the default
allocation), optionally heal on the calibration part for a number of minutes, save with `lrcompile.save` beside
the tokenizer and config, and score the one-shot and healed models against the original on the held-out part
(mean cosine of mask-weighted mean-pooled last hidden states). Nothing is downloaded.
"""

from __future__ import annotations

import copy
import os
import random
import time

import torch
from torch import nn

from ..errors import LrcompileError, first_line

MAX_TEXT_BYTES = 64 << 20  # a sentence file larger than this is refused (read whole into memory)
MAX_HELD_OUT = 1000  # held-out sentences scored (each costs a forward of both models)
MAX_STATS_SENTENCES = 512  # statistics: ~10k tokens are plenty; healing uses every calibration sentence
HELD_OUT_FRACTION = 0.1


def read_sentences(path: str) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file; one-line errors for what cannot be used."""
    if not os.path.isfile(path):
        raise LrcompileError(f"--text {path}: not a regular file")
    size = os.path.getsize(path)
    if size > MAX_TEXT_BYTES:
        raise LrcompileError(f"--text {path}: {size:,} bytes, more than the {MAX_TEXT_BYTES:,} accepted")
    with open(path, "rb") as f:
        raw = f.read(MAX_TEXT_BYTES + 1)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LrcompileError(f"--text {path}: not UTF-8 at line {line} (byte {e.start})") from None
    sentences = [s.strip() for s in text.splitlines() if s.strip()]
    if len(sentences) < 2:
        raise LrcompileError(f"--text {path}: {len(sentences)} sentences; at least 2 (calibration and held-out)")
    return sentences


def split_sentences(sentences: list[str], fraction: float = HELD_OUT_FRACTION, seed: int = 0):
    """(calibration, held-out): a seeded shuffle, held-out = `fraction` of it (1 to MAX_HELD_OUT sentences)."""
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    k = max(1, min(MAX_HELD_OUT, len(sentences) - 1, round(fraction * len(sentences))))
    held = set(order[:k])
    return [s for i, s in enumerate(sentences) if i not in held], [sentences[i] for i in sorted(held)]


def load_hf(model_dir: str):
    """(model in eval mode, tokenizer) from a local HF directory, nothing fetched; one-line errors."""
    if not os.path.isdir(model_dir) or not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise LrcompileError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the directory holds: one line saying what failed
        raise LrcompileError(f"{model_dir}: cannot load the model or tokenizer ({first_line(e)})") from None
    return model.eval(), tok


def load_compressed(directory: str):
    """(model, tokenizer) from a directory `compress` wrote: the architecture from its config, then
    `lrcompile.load` (the factors, not dense weights: `from_pretrained` cannot read it)."""
    import transformers

    from .persist import load

    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
        tok = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise LrcompileError(f"{directory}: no config or tokenizer to rebuild from ({first_line(e)})") from None
    return load(transformers.AutoModel.from_config(config), directory).eval(), tok


def block_lists(model: nn.Module) -> list[str]:
    """Paths of the model's stacks of repeated blocks holding linears (an encoder's layers; an encoder-decoder's
    two stacks): every nn.ModuleList of ≥ 2 elements of one class, outside any list already found."""
    from ..capture.modules import linear_modules

    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2 or len({type(b) for b in mod}) != 1:
            continue
        if any(name.startswith(f + ".") for f in found):
            continue
        if linear_modules(mod):
            found.append(name)
    return found


def policy_for(model: nn.Module, budget: float) -> dict:
    blocks = block_lists(model)
    if not blocks:
        raise LrcompileError("the model has no stack of repeated blocks with linear layers to compress")
    rules = [{"match": f"{b}.*", "method": "lowrank", "init": "whitened_svd"} for b in blocks]
    return {"budget": {"params": budget}, "rules": rules + [{"match": "*", "method": "dense"}]}


def batches_of(tok, sentences: list[str], size: int, max_length: int) -> list[dict]:
    return [
        dict(tok(sentences[i : i + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        for i in range(0, len(sentences), size)
    ]


def embed(model: nn.Module, batches, desc: str, progress: bool) -> torch.Tensor:
    """Mask-weighted mean-pooled last hidden states, one row per sentence."""
    from tqdm.auto import tqdm

    out = []
    with torch.no_grad():
        for b in tqdm(batches, desc=desc, disable=not progress):
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append((h * m).sum(1) / m.sum(1).clamp_min(1))
    return torch.cat(out)


def _cos(a: torch.Tensor, b: torch.Tensor) -> dict:
    c = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {"mean": float(c.mean()), "min": float(c.min())}


def _check_out(out: str, model_dir: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise LrcompileError(f"--out {out}: exists and is not a directory")
    if os.path.isdir(out) and os.path.samefile(out, model_dir):
        raise LrcompileError(f"--out {out}: is the model directory itself; choose another")


def compress(
    model_dir: str,
    text: str,
    budget: float,
    out: str,
    *,
    heal_minutes: float = 0.0,
    batch_size: int = 32,
    max_length: int = 128,
    progress: bool = True,
    log=print,
) -> dict:
    """Run the pipeline (module docstring); returns what it measured: sites rewritten, parameters kept, the
    held-out cosines `one_shot` and (with healing) `healed`, heal's report, each stage's seconds, and the
    compressed `model`."""
    if not 0.0 < budget <= 1.0:
        raise LrcompileError(f"--budget {budget}: a fraction of the parameters in (0, 1]")
    if not heal_minutes >= 0:
        raise LrcompileError(f"--heal-minutes {heal_minutes}: a number of minutes ≥ 0")
    _check_out(out, model_dir)
    import lrcompile

    from .heal import heal, summary

    times: dict[str, float] = {}
    t = time.monotonic()
    sentences = read_sentences(text)
    model, tok = load_hf(model_dir)
    cal_text, held_text = split_sentences(sentences)
    cal = batches_of(tok, cal_text, batch_size, max_length)
    held = batches_of(tok, held_text, batch_size, max_length)
    policy = policy_for(model, budget)
    blocks = ", ".join(r["match"] for r in policy["rules"][:-1])
    log(f"{len(cal_text)} calibration and {len(held_text)} held-out sentences; compressing {blocks}")
    ref = embed(model, held, "lrcompile score (original)", progress)
    times["load"] = time.monotonic() - t

    t = time.monotonic()
    stats = lrcompile.calibrate(model, cal[: max(1, MAX_STATS_SENTENCES // batch_size)], policy, progress=progress)
    times["calibrate"] = time.monotonic() - t
    t = time.monotonic()
    student = copy.deepcopy(model)
    example = {k: v[:2] for k, v in cal[0].items()}
    lrcompile.rewrite(student, policy, example, calibration=stats, progress=progress)
    times["rewrite"] = time.monotonic() - t
    report = student.lrcompile_report
    rewritten = [r for r in report.sites() if r.status == "rewritten"]
    if not rewritten:
        raise LrcompileError(f"{model_dir}: no site was rewritten (see the report above)")
    log(report.table())
    planned = [r for r in report.sites() if r.method == "lowrank" and r.params_before]  # the budget's sites
    before = sum(r.params_before for r in planned)
    after = sum(r.params_after if r.status == "rewritten" else r.params_before for r in planned)
    result = {
        "sites_rewritten": len(rewritten),
        "sites": len(planned),
        "params_kept": after / before,
        "one_shot": _cos(embed(student, held, "lrcompile score (one-shot)", progress), ref),
        "healed": None,
        "heal": None,
        "seconds": times,
        "model": student,
    }
    if heal_minutes > 0:
        t = time.monotonic()
        info: dict = {}
        heal(student, model, cal, max_minutes=heal_minutes, report=info, progress=progress)
        times["heal"] = time.monotonic() - t
        result["heal"] = info
        result["healed"] = _cos(embed(student, held, "lrcompile score (healed)", progress), ref)
        if not progress:
            log(summary(info))

    t = time.monotonic()
    os.makedirs(out, exist_ok=True)
    lrcompile.save(student, out)
    tok.save_pretrained(out)
    model.config.save_pretrained(out)
    times["save"] = time.monotonic() - t
    line = (
        f"held-out mean cosine to the original ({len(held_text)} sentences): one-shot {result['one_shot']['mean']:.4f}"
        f" (min {result['one_shot']['min']:.4f})"
    )
    if result["healed"]:
        line += f", healed {result['healed']['mean']:.4f} (min {result['healed']['min']:.4f})"
    log(line)
    log(
        f"{len(rewritten)} of {len(planned)} sites rewritten, keeping {result['params_kept']:.1%} of their parameters;"
        f" saved to {out} (load with "
        f"lrcompile.lifecycle.compress.load_compressed); " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    )
    return result
