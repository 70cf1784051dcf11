"""Why ``tilefx.Recovery()`` defaults to what it does: candidate recovery recipes on
all-MiniLM-L6-v2 (real weights), one block pruning, one calibration corpus, one run.

    .venv/bin/python benchmarks/recovery_defaults.py --out benchmarks/results/recovery_defaults.md

Every candidate prunes the same way (``BlockPruning(block, sparsity)``, no reordering) on the
same mixed calibration text (Python's docs and general English, 32 + 4 batches of 16; one row
calibrates on the docs alone, to show what a narrow corpus costs elsewhere), and is
judged on three held-out sets no calibration reads: in-domain (Python docs), everyday English and
news (cosine of the sentence embeddings to the dense model's; nearest-neighbour agreement on the
everyday set). The candidates: the earlier defaults (gradual magnitude pruning over 500 steps),
the refit alone (``steps=0``), the earlier demo's distillation (lr 1e-3, every parameter, no
check), and 300 steps at two learning rates, training the layers only or everything, with the
held-out check; docs/recovery.md says which one ``Recovery()`` is. Speed is not compared: the same blocks at the same
sparsity compile to the same kernels (benchmarks/frontier.py times them). Never imported by tests.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

import tilefx
from tilefx.corpus import calibration_sentences, english_sentences, out_of_domain_sentences
from tilefx.models import SentenceEmbedder
from tilefx.zoo import load_minilm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import save_result  # noqa: E402
from frontier import BATCH, LENGTH, quality, references  # noqa: E402


def candidates() -> dict[str, tuple[tilefx.Recovery, str]]:
    """name -> (recovery, calibration corpus). Every row after the first is the one-shot refit on
    32 batches (``reconstruct=32``) followed by what the row says."""
    return {
        "earlier defaults: gradual magnitude, 500 steps, lr 1e-4, all parameters, no refit": (
            tilefx.Recovery(
                schedule="gradual", steps=500, warmup=0.05, trainable="all", check_batches=0, progress=False
            ),
            "mixed",
        ),
        "refit only (steps=0)": (tilefx.Recovery(steps=0, progress=False), "mixed"),
        "300 steps, lr 1e-3, all parameters, pooled loss, no check (earlier demo)": (
            tilefx.Recovery(lr=1e-3, trainable="all", output_loss="pooled", check_batches=0, progress=False),
            "mixed",
        ),
        "300 steps, lr 1e-4, layers only, check": (
            tilefx.Recovery(lr=1e-4, trainable="layers", progress=False),
            "mixed",
        ),
        "300 steps, lr 1e-3, layers only, check": (
            tilefx.Recovery(lr=1e-3, trainable="layers", progress=False),
            "mixed",
        ),
        "300 steps, lr 1e-3, all parameters, check": (
            tilefx.Recovery(lr=1e-3, trainable="all", progress=False),
            "mixed",
        ),
        "300 steps, lr 1e-3, layers only, check, calibrated on Python docs alone": (
            tilefx.Recovery(lr=1e-3, trainable="layers", progress=False),
            "docs",
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", default="16x1", help="block shape, rows x columns")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--out", type=Path, default=None, help="write the table here (markdown)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=tilefx.CoverageWarning)
    torch.manual_seed(0)
    block = tuple(int(v) for v in args.block.split("x"))
    minilm = load_minilm()
    dense = SentenceEmbedder(minilm.model).eval()
    corpora = {
        kind: [(b, None) for b in minilm.batches(calibration_sentences(kind)[: BATCH * 36], BATCH, LENGTH)]
        for kind in ("mixed", "docs")
    }
    sets = {"in-domain": english_sentences()[1], **out_of_domain_sentences()}
    evaluation = {name: minilm.batches(sentences, BATCH, LENGTH) for name, sentences in sets.items()}
    reference = references(dense, evaluation)
    blocks = tilefx.BlockPruning(block=block, sparsity=args.sparsity, reorder="none")  # type: ignore[arg-type]
    lines = [
        f"{args.block} blocks at {args.sparsity:.0%}, 36 calibration batches of {BATCH} sentences "
        "(mixed: half Python docs, half Wikipedia, unless the row says otherwise)",
        "",
        "| recovery | in-domain cos | everyday cos | news cos | everyday NN | optimize s |",
        "|---|---|---|---|---|---|",
    ]
    for name, (recovery, kind) in candidates().items():
        calibration = corpora[kind]
        start = time.perf_counter()
        recipe = tilefx.Recipe(blocks=blocks, recovery=recovery)
        pruned = tilefx.optimize(dense, calibration[0][0], recipe, calibration=calibration)
        seconds = time.perf_counter() - start
        q = quality(reference, pruned, evaluation)
        lines.append(
            f"| {name} | {q['in-domain'][0]:.3f} | {q['everyday'][0]:.3f} | {q['news'][0]:.3f} | "
            f"{q['everyday'][1]:.3f} | {seconds:.0f} |"
        )
        print(lines[-1], file=sys.stderr)
    body = "\n".join(lines)
    print(body)
    if args.out is not None:
        save_result(args.out, "Recovery() defaults against the alternatives, all-MiniLM-L6-v2", body)


if __name__ == "__main__":
    main()
