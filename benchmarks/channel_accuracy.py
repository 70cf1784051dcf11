"""Accuracy of channel pruning on real labelled data that ships offline: scikit-learn's digits.

A small CNN (conv-bn-relu ×3, global average pool, linear) is trained on a fixed split of the
1797 8×8 digits, then pruned to ~50% of its MACs with each criterion (L1, Taylor, DCP) through
``tilefx.optimize``, and fine-tuned with the same budget (same epochs, SGD, data order). One ratio
serves every criterion: the channel ratio whose L1-pruned model has MACs closest to the target,
so the criteria differ only in *which* channels go. Deterministic (seeds); prints a markdown table.

    OMP_NUM_THREADS=1 python benchmarks/channel_accuracy.py [--seeds 3] [--finetune-epochs 5]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import count_macs, count_params, machine  # noqa: E402

import tilefx  # noqa: E402
from tilefx.passes.criteria.dcp import SGDOptions  # noqa: E402
from tilefx.passes.training.calibration import Calibration  # noqa: E402
from tilefx.passes.training.loop import train  # noqa: E402

log = logging.getLogger("channel_accuracy")

CRITERIA = ("l1", "taylor", "dcp")


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(seed: int = 0) -> Split:
    """The bundled digits, scaled to [0, 1], stratified 70/30 split fixed by ``seed``."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    train, test = train_test_split(np.arange(len(y)), test_size=0.3, random_state=seed, stratify=data.target)
    return Split(x[train], y[train], x[test], y[test])


class DigitsCNN(nn.Module):
    def __init__(self, widths: tuple[int, int, int] = (32, 64, 64)) -> None:
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(
            nn.Conv2d(1, a, 3, padding=1, bias=False), nn.BatchNorm2d(a), nn.ReLU(),
            nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(b, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        )  # fmt: skip
        self.classifier = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class Shuffled:
    """Mini-batches of (x, y), reshuffled every pass by a seeded generator (re-iterable)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> None:
        self.x, self.y, self.batch = x, y, batch
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.y), generator=self.generator)
        for start in range(0, len(order), self.batch):
            index = order[start : start + self.batch]
            yield self.x[index], self.y[index]


def train_dense(split: Split, seed: int, epochs: int) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    batches = Shuffled(split.x_train, split.y_train, 64, seed)
    for _ in range(epochs):
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


def calibration_batches(split: Split, images: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``images`` training images in batches of 128, chosen by a seeded shuffle (Taylor and DCP)."""
    return list(Shuffled(split.x_train, split.y_train, 128, seed))[: max(1, images // 128)]


def prune(model: nn.Module, split: Split, criterion: str, ratio: float, calibration: Any = None) -> Any:
    """``tilefx.optimize`` with a channel-pruning recipe."""
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=ratio, criterion=criterion))  # type: ignore[arg-type]
    return tilefx.optimize(model, (split.x_test[:2],), recipe=recipe, calibration=calibration)


def ratio_for_macs(model: nn.Module, split: Split, target: float) -> float:
    """The channel ratio (step 0.01) whose L1-pruned MACs are closest to ``target`` × dense."""
    dense = count_macs(model, (split.x_test[:1],))
    best, best_gap = 0.0, float("inf")
    for ratio in np.arange(0.20, 0.41, 0.01):
        pruned = prune(model, split, "l1", float(ratio))
        gap = abs(count_macs(pruned, (split.x_test[:1],)) / dense - target)
        if gap < best_gap:
            best, best_gap = float(ratio), gap
    return best


def run(seed: int, ratio: float, split: Split, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One training seed: train, then prune + fine-tune a copy with each criterion."""
    model = train_dense(split, seed, args.train_epochs)
    dense_acc = accuracy(model, split.x_test, split.y_test)
    x1 = (split.x_test[:1],)
    dense_macs, dense_params = count_macs(model, x1), count_params(model)
    calibration = calibration_batches(split, args.calibration, seed)
    rows = [dict(seed=seed, criterion="dense", ratio=0.0, macs=dense_macs, params=dense_params,
                 before=dense_acc, pruned=dense_acc, tuned=dense_acc, seconds=0.0)]  # fmt: skip
    for criterion in args.criteria:
        start = time.perf_counter()
        pruned = prune(copy.deepcopy(model), split, criterion, ratio, calibration)
        seconds = time.perf_counter() - start
        after = accuracy(pruned, split.x_test, split.y_test)
        finetune(pruned, Shuffled(split.x_train, split.y_train, 64, seed + 1), args)
        rows.append(dict(seed=seed, criterion=criterion, ratio=ratio, macs=count_macs(pruned, x1),
                         params=count_params(pruned), before=dense_acc, pruned=after,
                         tuned=accuracy(pruned, split.x_test, split.y_test), seconds=seconds))  # fmt: skip
    return rows


def finetune(model: nn.Module, batches: Shuffled, args: argparse.Namespace) -> None:
    """Every parameter, ``--finetune-epochs`` passes of DCP's SGD (Nesterov) on the training loop."""
    for p in model.parameters():
        p.requires_grad_(True)
    per_epoch = -(-len(batches.y) // batches.batch)
    options = SGDOptions(lr=args.lr, epochs=args.finetune_epochs).loop_options(per_epoch)
    data = Calibration(batches)
    train(model, lambda m, inputs, labels: data.loss_of(m(*inputs), labels), data, options)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| criterion | channel ratio | MACs | params | acc. before | acc. right after pruning | acc. after fine-tune | prune time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for criterion in dict.fromkeys(r["criterion"] for r in rows):
        mine = [r for r in rows if r["criterion"] == criterion]

        def cell(key: str, mine: list[dict[str, Any]] = mine) -> str:
            values = [r[key] for r in mine]
            if len(values) == 1:
                return f"{values[0]:.2f}"
            return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

        first = mine[0]
        lines.append(
            f"| {criterion} | {first['ratio']:.2f} | {first['macs']:,} | {first['params']:,} | {cell('before')} "
            f"| {cell('pruned')} | {cell('tuned')} | {cell('seconds')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (mean ± std reported)")
    parser.add_argument("--train-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.01, help="fine-tune SGD learning rate")
    parser.add_argument("--target", type=float, default=0.5, help="pruned MACs / dense MACs")
    parser.add_argument("--ratio", type=float, default=None, help="fixed channel ratio (skips the search)")
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    parser.add_argument("--calibration", type=int, default=256, help="training images Taylor and DCP read")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    split = load_digits(seed=0)  # the split is fixed; seeds vary training, calibration and data order
    if args.ratio is None:  # MACs depend on how many channels go, not which: one search serves all
        args.ratio = ratio_for_macs(train_dense(split, 0, 1), split, args.target)
    rows = [row for seed in range(args.seeds) for row in run(seed, args.ratio, split, args)]
    print(
        f"digits (sklearn, {len(split.y_train)} train / {len(split.y_test)} test), {args.seeds} seed(s); {machine()}"
    )
    print(f"calibration for taylor/dcp: {args.calibration} training images; channel ratio {args.ratio:.2f}")
    print(
        f"fine-tune: {args.finetune_epochs} epochs SGD lr {args.lr} (Nesterov, momentum 0.9, wd 1e-4), batch 64\n"
    )
    print(table(rows))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
