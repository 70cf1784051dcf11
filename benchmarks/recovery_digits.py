"""The CNN row of issue 12: a CNN trained here on scikit-learn's digits, block-pruned with recovery.

A small BN CNN (8×8 grey digits, 64/128/128 channels so the convs have blocks to prune) is trained
dense with tilefx's own training loop; then ``tilefx.optimize`` prunes every conv and linear in
16×1 blocks at 80% (TETRIS or none), one-shot and with ``Recovery`` (labels, plus distillation
of the dense logits), and ``tilefx.compile`` lowers it. Reported: test accuracy (dense, one-shot,
recovered) and the median latency of dense torch and of the compiled model on one batch.
Data: ``sklearn.datasets.load_digits`` (ships with scikit-learn), 1400 train / 397 test images.

    .venv/bin/python benchmarks/recovery_digits.py --steps 600
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from _measure import save_result
from sklearn.datasets import load_digits
from torch import nn

import tilefx
from tilefx.passes.training.calibration import Calibration
from tilefx.passes.training.loop import LoopOptions, train
from tilefx.report import median_ms

BATCH = 64


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(128)
        self.conv3 = nn.Conv2d(128, 128, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(128)
        self.fc = nn.Linear(128 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(x, 1))


def digits() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]], int]:
    """(train batches, test batches padded to full size, number of test images), all [BATCH, 1, 8, 8]."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]

    def chunks(x: torch.Tensor, y: torch.Tensor, pad: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if pad and len(y) % BATCH:
            fill = BATCH - len(y) % BATCH
            x, y = torch.cat([x, x[:fill]]), torch.cat([y, y[:fill]])
        return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(y) - BATCH + 1, BATCH)]

    return chunks(x[:1400], y[:1400], False), chunks(x[1400:], y[1400:], True), len(y) - 1400


def accuracy(model: nn.Module, test: Sequence[tuple[torch.Tensor, torch.Tensor]], count: int) -> float:
    with torch.no_grad():
        hits = torch.cat([model(x).argmax(1) == y for x, y in test])[:count]
    return float(hits.float().mean())


def train_dense(batches: list[tuple[torch.Tensor, torch.Tensor]], epochs: int) -> nn.Module:
    torch.manual_seed(0)
    model = DigitsCNN()

    def loss(m: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(m(*inputs), labels)

    options = LoopOptions(
        steps=epochs * len(batches), lr=0.05, optimizer="sgd", weight_decay=1e-4, progress=False
    )
    train(model, loss, Calibration(batches), options)
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=10, help="dense training epochs")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--block", default="16x1")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    block = tuple(int(b) for b in args.block.split("x"))
    train_batches, test, count = digits()
    start = time.perf_counter()
    dense = train_dense(train_batches, args.epochs)
    print(
        f"dense CNN trained in {time.perf_counter() - start:.0f} s: test accuracy {accuracy(dense, test, count):.3f}"
    )
    example = (test[0][0],)
    lines = [
        "| block | sparsity | reorder | steps | recovery s | dense acc | one-shot acc | recovered acc | dense ms | compiled ms | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for reorder in ("tetris", "none"):
        blocks = tilefx.BlockPruning(block=block, sparsity=args.sparsity, reorder=reorder)  # type: ignore[arg-type]
        oneshot = tilefx.optimize(dense, example, tilefx.Recipe(blocks=blocks))
        recovery = tilefx.Recovery(
            steps=args.steps, lr=args.lr, distill="output", output_loss="kl", progress=False
        )
        start = time.perf_counter()
        pruned = tilefx.optimize(
            dense, example, tilefx.Recipe(blocks=blocks, recovery=recovery), calibration=train_batches
        )
        seconds = time.perf_counter() - start
        compiled = tilefx.compile(pruned, "llvm")
        x = test[0][0]
        dense_ms, compiled_ms = (
            median_ms(functools.partial(dense, x)),
            median_ms(functools.partial(compiled, x)),
        )
        lines.append(
            f"| {block[0]}x{block[1]} | {args.sparsity:.0%} | {reorder} | {args.steps} | {seconds:.0f} | "
            f"{accuracy(dense, test, count):.3f} | {accuracy(oneshot, test, count):.3f} | "
            f"{accuracy(compiled, test, count):.3f} | {dense_ms:.2f} | {compiled_ms:.2f} | {dense_ms / compiled_ms:.2f}x |"
        )
        print(lines[-1], flush=True)
    result = "\n".join(lines)
    print(result)
    if args.out is not None:
        save_result(args.out, "Recovery on a digits CNN", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
