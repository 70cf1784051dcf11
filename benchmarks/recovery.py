"""Recovered quality and compiled speed of block-pruned all-MiniLM-L6-v2 (issue 12), in one run.

For each block shape, sparsity and reordering (TETRIS or none): ``tilefx.optimize`` with
``Recipe(blocks=..., recovery=Recovery(...))`` distils the pruned model from the dense one on
real English text that ships offline (Python's documentation topics and standard-library
docstrings, :mod:`tilefx.corpus`), then
``tilefx.compile`` lowers it to TVM kernels. Reported per row, on held-out sentences of the same
source that training never sees (a disjoint split):

- cosine: mean cosine of mean-pooled sentence embeddings, pruned vs dense;
- NN agreement: the fraction of held-out sentences whose most similar *other* held-out sentence
  is the same under the pruned model as under the dense one;
- one-shot cosine: the same pruning without recovery (steps=0), for reference;
- latency: median ms of dense torch and of the compiled model on one [16, 32] batch, same run.

The budget is ``--steps`` optimiser steps, or ``--minutes`` of recovery per row (converted to
steps from a short timing of training steps before the first row, since the schedule needs the
step count up front).

    .venv/bin/python benchmarks/recovery.py --blocks 16x1 --sparsities 0.8 --minutes 12
    .venv/bin/python benchmarks/recovery.py --minutes 3 --out benchmarks/results/recovery_curve.md
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.fx
from _measure import save_result

import tilefx
from tilefx.corpus import english_sentences
from tilefx.passes.infra import TimingInstrument
from tilefx.report import embedding_quality
from tilefx.timing import interleaved_timings
from tilefx.zoo import MiniLM, load_minilm

BATCH, LENGTH, HELD_OUT = 16, 32, 160

# Python puts this script's folder first on sys.path, where benchmarks/kernels.py would shadow the
# `kernels` package transformers probes for when it imports BERT.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
Inputs = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Row:
    block: tuple[int, int]
    sparsity: float
    reorder: str
    steps: int
    recovery_s: float
    reorder_s: float
    step_s: float
    oneshot_cosine: float
    cosine: float
    agreement: float
    dense_ms: float
    compiled_ms: float
    lowered: str


def recipe(
    args: argparse.Namespace, block: tuple[int, int], sparsity: float, reorder: str, steps: int
) -> tilefx.Recipe:
    recovery = tilefx.Recovery(
        steps=steps,
        lr=args.lr,
        schedule=args.schedule,
        reconstruct=args.reconstruct,
        distill=args.distill,
        output_loss=args.output_loss,
        score=args.score,
        trainable=args.trainable,
        ramp=args.ramp,
        every=args.every,
        warmup=args.warmup,
        decay=args.decay,
        hidden_taps=args.hidden_taps,
        token_mask=None if args.no_token_mask else 1,  # BertModel(input_ids, attention_mask)
        progress=not args.quiet,
        checkpoint_dir=None
        if args.checkpoint_dir is None or not steps
        else f"{args.checkpoint_dir}/{block[0]}x{block[1]}_{sparsity}_{reorder}_{steps}",
    )
    blocks = tilefx.BlockPruning(block=block, sparsity=sparsity, reorder=reorder)  # type: ignore[arg-type]
    return tilefx.Recipe(blocks=blocks, recovery=recovery)


def optimize(
    minilm: MiniLM, recipe_: tilefx.Recipe, train: list[tuple[Inputs, None]], train_threads: int = 0
) -> tuple[torch.fx.GraphModule, dict[str, float]]:
    """The optimized model and the seconds spent in each pass (by pass name).

    train_threads: torch threads while optimizing (0: as set). On a shared machine one thread
    avoids the OpenMP barrier stalls that made a 2-thread step ~10x slower beside another busy job.
    """
    timing = TimingInstrument()
    threads = torch.get_num_threads()
    torch.set_num_threads(train_threads or threads)
    try:
        gm = tilefx.optimize(minilm.model, train[0][0], recipe_, calibration=train, instruments=[timing])
    finally:
        torch.set_num_threads(threads)
    return gm, {t.name: t.seconds for t in timing.timings}


def seconds_per_step(args: argparse.Namespace, minilm: MiniLM, train: list[tuple[Inputs, None]]) -> float:
    probe = argparse.Namespace(**{**vars(args), "quiet": True})
    short, longer = 2, 6
    times = []
    for steps in (short, longer):
        start = time.perf_counter()
        optimize(minilm, recipe(probe, (16, 1), 0.5, "none", steps), train[:8], args.train_threads)
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / (longer - short)


def run_row(
    args: argparse.Namespace,
    minilm: MiniLM,
    train: list[tuple[Inputs, None]],
    held: list[Inputs],
    dense: torch.Tensor,
    key: tuple[tuple[int, int], float, str],
    steps: int,
) -> Row:
    block, sparsity, reorder = key
    oneshot_cosine = float("nan")
    if not args.no_oneshot:
        oneshot, _ = optimize(minilm, recipe(args, block, sparsity, reorder, 0), train, args.train_threads)
        oneshot_cosine, _ = embedding_quality(dense, minilm.embed(oneshot, held, HELD_OUT))
    start = time.perf_counter()
    pruned, seconds = optimize(
        minilm, recipe(args, block, sparsity, reorder, steps), train, args.train_threads
    )
    recovery_s = time.perf_counter() - start
    reorder_s = sum(v for k, v in seconds.items() if "Reorder" in k)
    train_s = sum(v for k, v in seconds.items() if "RecoverSparsity" in k)
    cosine, agreement = embedding_quality(dense, minilm.embed(pruned, held, HELD_OUT))
    dense_ms = compiled_ms = float("nan")
    lowered = "-"
    if not args.no_compile:
        from tilefx.lowering.build import lowering_choices  # imports tvm

        compiled = tilefx.compile(pruned, target="llvm")
        choices = lowering_choices(compiled)
        lowered = f"{sum(c.lowered for c in choices)}/{len(choices)}"
        x = held[0]
        times = interleaved_timings(
            {"dense": lambda: minilm.model(*x), "compiled": lambda: compiled(*x)}, rounds=args.repeats
        )
        dense_ms, compiled_ms = times["dense"].median, times["compiled"].median
    return Row(
        block,
        sparsity,
        reorder,
        steps,
        recovery_s,
        reorder_s,
        train_s / max(steps, 1),
        oneshot_cosine,
        cosine,
        agreement,
        dense_ms,
        compiled_ms,
        lowered,
    )


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| block | sparsity | reorder | steps | recovery s | TETRIS s | s/step | one-shot cos | cosine | NN agreement | dense ms | compiled ms | speed-up | lowered |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.block[0]}x{r.block[1]} | {r.sparsity:.0%} | {r.reorder} | {r.steps} | {r.recovery_s:.0f} | "
            f"{r.reorder_s:.0f} | {r.step_s:.2f} | "
            f"{r.oneshot_cosine:.3f} | {r.cosine:.3f} | {r.agreement:.3f} | {r.dense_ms:.1f} | {r.compiled_ms:.1f} | "
            f"{r.dense_ms / r.compiled_ms:.2f}x | {r.lowered} |"
        )
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", default="16x1,32x32")
    parser.add_argument("--sparsities", default="0.5,0.7,0.8,0.9")
    parser.add_argument("--reorders", default="tetris,none")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="optimiser steps per row")
    budget.add_argument("--minutes", type=float, default=None, help="recovery wall time per row")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--schedule", default="gradual", choices=["gradual", "oneshot"])
    parser.add_argument(
        "--reconstruct",
        type=int,
        default=0,
        help="calibration batches for layer-wise reconstruction (oneshot)",
    )
    parser.add_argument("--distill", default="hidden", choices=["output", "hidden"])
    parser.add_argument("--output-loss", default="pooled", choices=["cosine", "pooled", "mse", "kl"])
    parser.add_argument("--hidden-taps", default="norms", choices=["inputs", "outputs", "norms"])
    parser.add_argument("--no-token-mask", action="store_true", help="match padding positions too")
    parser.add_argument("--score", default="magnitude", choices=["magnitude", "movement"])
    parser.add_argument("--trainable", default="all", choices=["all", "layers"])
    parser.add_argument("--ramp", type=float, default=0.6)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--warmup", type=float, default=0.05)
    parser.add_argument("--decay", default="linear", choices=["constant", "linear", "cosine"])
    parser.add_argument("--topics-only", action="store_true", help="train on pydoc topics only")
    parser.add_argument("--checkpoint-dir", default=None, help="checkpoint each row here; a rerun resumes it")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-oneshot", action="store_true", help="skip the one-shot (steps=0) reference")
    parser.add_argument(
        "--train-threads", type=int, default=0, help="torch threads while training (0: default)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--out", type=Path, default=None, help="write the table as markdown here")
    return parser.parse_args()


def main() -> int:
    args = parse()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("tilefx.passes.training.loop").setLevel(logging.INFO)  # a line per 50 steps
    torch.manual_seed(0)
    minilm = load_minilm()
    train_text, held_text = english_sentences(HELD_OUT, docstrings=not args.topics_only)
    train = [(x, None) for x in minilm.batches(train_text, BATCH, LENGTH)[:-1]]  # drop the padded last batch
    held = minilm.batches(held_text, BATCH, LENGTH)
    dense = minilm.embed(minilm.model, held, HELD_OUT)
    steps = args.steps if args.steps is not None else 300
    if args.minutes is not None:
        per_step = seconds_per_step(args, minilm, train)
        steps = max(1, int(args.minutes * 60 / per_step))
        print(f"{per_step:.2f} s a step: {args.minutes} min is {steps} steps", flush=True)
    print(
        f"{len(train)} training batches of {BATCH}x{LENGTH} ({len(train_text)} sentences), {len(held_text)} held out"
    )
    rows = []
    for block_text in args.blocks.split(","):
        block = tuple(int(b) for b in block_text.split("x"))
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            for reorder in args.reorders.split(","):
                row = run_row(args, minilm, train, held, dense, (block, sparsity, reorder), steps)  # type: ignore[arg-type]
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    result = table(rows)
    print(result)
    if args.out is not None:
        save_result(args.out, "Recovery on all-MiniLM-L6-v2", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
