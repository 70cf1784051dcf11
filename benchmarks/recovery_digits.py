"""The CNN row of issue 12: a CNN trained here on real offline images, block-pruned with recovery.

A BN CNN with 64/128/128/256 channels (so 16×1 blocks tile every conv and the sparse kernels have
work to skip) is trained dense with tilefx's own training loop; then, for each reorder (TETRIS or
none), ``tilefx.optimize`` prunes its convs in 16×1 blocks at 80% (the 10-way classifier is not a
multiple of 16 rows and stays dense):

- one-shot: ``Recipe(blocks=...)``, no training;
- recovered: ``Recipe(blocks=..., recovery=Recovery(...))`` with ``calibration=`` the labelled
  training batches (cross-entropy on the labels plus KL distillation of the dense logits, sparsity
  rising along the cubic schedule);

and ``tilefx.compile`` lowers the recovered model (its output checked against the torch model it
came from). Reported: test accuracy of dense torch, one-shot and the compiled recovered model, and
the medians of dense torch, the dense model with batch norms folded (``optimize`` with an empty
recipe; torch) and the compiled recovered model on one batch, timed round-robin in the same run (speed-up: dense torch / compiled recovered).

Data (both ship offline): ``--data digits`` (scikit-learn's 1797 8×8 digits, 1400 train / 397 test)
or ``--data fashion-mnist`` (60k/10k 28×28 images from the Debian package ``dataset-fashion-mnist``,
read from ``--data-dir``, default /usr/share/datasets/fashion-mnist; the stem conv has stride 2).

    .venv/bin/python benchmarks/recovery_digits.py --steps 600 --out benchmarks/results/recovery_cnn_digits.md
    .venv/bin/python benchmarks/recovery_digits.py --data fashion-mnist --epochs 2 --steps 600
"""

from __future__ import annotations

import argparse
import functools
import gzip
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _measure import machine, save_result
from torch import nn

import tilefx
from tilefx.passes.training.calibration import Calibration
from tilefx.passes.training.loop import LoopOptions, train

BATCH = 64
Batches = list[tuple[torch.Tensor, torch.Tensor]]


class CNN(nn.Module):
    """conv-BN-ReLU ×4 (64, 128, pool, 128, 256), global average pool, linear classifier."""

    def __init__(self, stem_stride: int) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(1, 64, stem_stride), block(64, 128), nn.MaxPool2d(2), block(128, 128), block(128, 256)
        )
        self.classifier = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def batches(x: torch.Tensor, y: torch.Tensor, pad: bool) -> Batches:
    """Full batches of BATCH (the compiled model has a static shape); ``pad`` repeats the first
    images to fill the last batch (accuracy then counts only the real ones)."""
    if pad and len(y) % BATCH:
        fill = BATCH - len(y) % BATCH
        x, y = torch.cat([x, x[:fill]]), torch.cat([y, y[:fill]])
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(y) - BATCH + 1, BATCH)]


def load_digits() -> tuple[Batches, Batches, int]:
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return batches(x[:1400], y[:1400], False), batches(x[1400:], y[1400:], True), len(y) - 1400


def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian dims after a 4-byte magic, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(folder: Path, train_images: int | None) -> tuple[Batches, Batches, int]:
    if not (folder / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(
            f"no Fashion-MNIST in {folder}: install the Debian package dataset-fashion-mnist "
            "(or point --data-dir at its files)"
        )

    def split(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.tensor(_idx(folder / f"{prefix}-images-idx3-ubyte.gz"), dtype=torch.float32)
        labels = torch.tensor(_idx(folder / f"{prefix}-labels-idx1-ubyte.gz"), dtype=torch.long)
        return ((images / 255.0 - 0.286) / 0.353).unsqueeze(1), labels

    x, y = split("train")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:train_images]
    xt, yt = split("t10k")
    return batches(x[order], y[order], False), batches(xt, yt, True), len(yt)


def accuracy(
    model: Callable[[torch.Tensor], torch.Tensor],
    test: Sequence[tuple[torch.Tensor, torch.Tensor]],
    count: int,
) -> float:
    with torch.no_grad():
        hits = torch.cat([model(x).argmax(1) == y for x, y in test])[:count]
    return float(hits.float().mean())


def train_dense(train_batches: Batches, epochs: int, stem_stride: int) -> nn.Module:
    torch.manual_seed(0)
    model = CNN(stem_stride)

    def loss(m: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(m(*inputs), labels)

    steps = epochs * len(train_batches)
    options = LoopOptions(steps=steps, lr=0.05, optimizer="sgd", weight_decay=1e-4, warmup=0.02)
    train(model, loss, Calibration(train_batches), options)
    return model.eval()


def round_robin_ms(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median milliseconds of each function, timed in turn each round (so load hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(), fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", choices=("digits", "fashion-mnist"), default="digits")
    parser.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--train-images", type=int, default=None, help="fashion-mnist: use this many")
    parser.add_argument("--epochs", type=int, default=None, help="dense training (digits 30, fashion 2)")
    parser.add_argument("--steps", type=int, default=600, help="recovery optimiser steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="recovery learning rate (AdamW)")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--block", default="16x1")
    parser.add_argument("--reorders", nargs="+", default=["none", "tetris"])
    parser.add_argument("--rounds", type=int, default=30, help="latency samples per model")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    block = tuple(int(b) for b in args.block.split("x"))
    if args.data == "digits":
        train_batches, test, count = load_digits()
        stride, epochs = 1, args.epochs or 30
    else:
        train_batches, test, count = load_fashion_mnist(args.data_dir, args.train_images)
        stride, epochs = 2, args.epochs or 2
    start = time.perf_counter()
    dense = train_dense(train_batches, epochs, stride)
    dense_acc = accuracy(dense, test, count)
    header = (
        f"{args.data}: {len(train_batches) * BATCH} training / {count} test images, batch {BATCH}; "
        f"dense CNN trained {epochs} epochs in {time.perf_counter() - start:.0f} s; {machine()}"
    )
    print(header, flush=True)
    example = (test[0][0],)
    lines = [
        "| block | sparsity | reorder | recovery steps | recovery s | dense acc | one-shot acc "
        "| recovered acc (compiled) | dense torch ms | folded dense ms | compiled ms | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # The unpruned model through optimize: batch norms folded, nothing for compile to lower (it
    # runs as torch), so compiled vs this is what the sparse kernels alone bring.
    folded_dense = tilefx.optimize(dense, example, tilefx.Recipe())
    for reorder in args.reorders:
        blocks = tilefx.BlockPruning(block=block, sparsity=args.sparsity, reorder=reorder)  # type: ignore[arg-type]
        oneshot = tilefx.optimize(dense, example, tilefx.Recipe(blocks=blocks))
        recovery = tilefx.Recovery(steps=args.steps, lr=args.lr, distill="output", output_loss="kl")
        start = time.perf_counter()
        recovered = tilefx.optimize(
            dense, example, tilefx.Recipe(blocks=blocks, recovery=recovery), calibration=train_batches
        )
        seconds = time.perf_counter() - start
        compiled = tilefx.compile(recovered, target="llvm")
        x = test[0][0]
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), recovered(x), rtol=1e-3, atol=1e-3)
        fns = {
            "dense": functools.partial(dense, x),
            "folded dense": functools.partial(folded_dense, x),
            "compiled": functools.partial(compiled, x),
        }
        ms = round_robin_ms(fns, args.rounds)
        lines.append(
            f"| {block[0]}x{block[1]} | {args.sparsity:.0%} | {reorder} | {args.steps} | {seconds:.0f} | "
            f"{dense_acc:.3f} | {accuracy(oneshot, test, count):.3f} | {accuracy(compiled, test, count):.3f} "
            f"| {ms['dense']:.2f} | {ms['folded dense']:.2f} | {ms['compiled']:.2f} "
            f"| {ms['dense'] / ms['compiled']:.2f}x |"
        )
        print(lines[-1], flush=True)
    result = header + "\n\n" + "\n".join(lines)
    print(result)
    if args.out is not None:
        save_result(args.out, f"Recovery on a CNN trained on {args.data}", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
