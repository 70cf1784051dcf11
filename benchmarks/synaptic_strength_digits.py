"""Synaptic Strength on scikit-learn's bundled digits: training-time form vs the post-training estimate.

A small BN CNN (8×8 inputs) is trained dense; then, at the same connection sparsity:
  1. post-training estimate (PruneConnectionsPass, |γ_in|·‖W[o,i]‖, global), no fine-tuning
     (and the plain kernel-L1 criterion for comparison);
  2. the same plus a fixed-mask fine-tune;
  3. training-time form (SynapticStrengthHook): reparameterise, train with λΣ|s|, threshold, fine-tune,
     materialise to plain convs.
Prints test accuracy for each. Data: sklearn.datasets.load_digits (ships with scikit-learn).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synaptic_strength_digits.py   # about 10 s on 1 core
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from tilefx.passes.analysis.weight_layers import LayerSelection
from tilefx.passes.infra.analysis_manager import AnalysisManager
from tilefx.passes.metadata import BlockSparsity, get_metadata
from tilefx.passes.prune_connections import PruneConnectionsPass
from tilefx.passes.training.calibration import Calibration
from tilefx.passes.training.learned_strength import SynapticStrengthHook
from tilefx.passes.training.loop import LoopHook, LoopOptions
from tilefx.passes.training.loop import train as loop_train


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(x, 1))


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


class Shuffled:
    """Batches of 64 of (x, y), reshuffled every pass by one seeded generator (re-iterable)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.generator = torch.Generator().manual_seed(1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in torch.randperm(len(self.y), generator=self.generator).split(64):
            yield self.x[idx], self.y[idx]


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, hooks: Sequence[LoopHook] = ()
) -> nn.Module:
    """``epochs`` passes of SGD (momentum 0.9, wd 1e-4, constant lr) on the one training loop."""
    options = LoopOptions(
        steps=epochs * math.ceil(len(y) / 64),
        lr=lr,
        optimizer="sgd",
        weight_decay=1e-4,
        decay="constant",
        progress=False,
    )
    data = Calibration(Shuffled(x, y))
    loop_train(model, lambda m, inputs, labels: F.cross_entropy(m(*inputs), labels), data, options, hooks)
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def conv_sparsity(model: nn.Module) -> float:
    total = zero = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            kernels = m.weight.detach().flatten(2).abs().sum(2)
            total, zero = total + kernels.numel(), zero + int((kernels == 0).sum())
    return zero / total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--penalty", type=float, default=1e-2)
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    xtr, ytr, xte, yte = data()
    dense = train(DigitsCNN(), xtr, ytr, args.epochs, 0.05)
    print(f"dense                                   test acc {accuracy(dense, xte, yte):.4f}")

    # 1-2: post-training estimate on the captured graph (convs only, as the paper prunes kernels)
    gm = torch.export.export(copy.deepcopy(dense), (xte[:2],), strict=False).module()
    pass_ = PruneConnectionsPass(args.sparsity, selection=LayerSelection(kinds=("conv",)))
    pass_.run(gm, AnalysisManager(gm, (xte[:2],)))
    pruned = copy.deepcopy(dense)
    masks = {
        name: rec.element_mask(p.shape)
        for name, p in pruned.named_parameters()
        for rec in get_metadata(gm).of(name, BlockSparsity)
    }
    with torch.no_grad():
        for name, p in pruned.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    assert torch.allclose(gm(xte[:2]), pruned.eval()(xte[:2]), atol=1e-5)  # the pass == hand-masked module
    print(
        f"post-training estimate, no fine-tune    test acc {accuracy(pruned, xte, yte):.4f}  "
        f"conv connection sparsity {conv_sparsity(pruned):.3f}"
    )

    # the same without the BN scale (plain kernel L1), to see what γ adds
    gm_l1 = torch.export.export(copy.deepcopy(dense), (xte[:2],), strict=False).module()
    l1 = PruneConnectionsPass(args.sparsity, criterion="l1", selection=LayerSelection(kinds=("conv",)))
    l1.run(gm_l1, AnalysisManager(gm_l1, (xte[:2],)))
    plain_l1 = copy.deepcopy(dense)
    with torch.no_grad():
        for name, p in plain_l1.named_parameters():
            for rec in get_metadata(gm_l1).of(name, BlockSparsity):
                p.mul_(rec.element_mask(p.shape))
    print(f"kernel-L1 criterion, no fine-tune       test acc {accuracy(plain_l1, xte, yte):.4f}")

    class Remask(LoopHook):
        def after_step(self, step: int) -> None:
            with torch.no_grad():
                for name, p in pruned.named_parameters():
                    if name in masks:
                        p.mul_(masks[name])

    tuned = train(pruned, xtr, ytr, max(2, args.epochs // 2), 0.01, [Remask()])
    print(
        f"post-training estimate + fine-tune      test acc {accuracy(tuned, xte, yte):.4f}  "
        f"conv connection sparsity {conv_sparsity(tuned):.3f}"
    )

    # 3: training-time form
    hook = SynapticStrengthHook(args.sparsity, penalty=args.penalty)
    model = hook.prepare(dense)
    train(model, xtr, ytr, max(2, args.epochs // 2), 0.02, [hook.loop_hook(model)])
    hook.prune(model)
    print(f"training-time, after threshold          test acc {accuracy(model, xte, yte):.4f}")
    train(model, xtr, ytr, max(2, args.epochs // 2), 0.01, [hook.loop_hook(model, penalise=False)])
    plain = hook.materialise(model)
    assert torch.allclose(plain.eval()(xte), model.eval()(xte), atol=1e-5)
    print(
        f"training-time + fine-tune, materialised test acc {accuracy(plain, xte, yte):.4f}  "
        f"conv connection sparsity {conv_sparsity(plain):.3f}"
    )
    print(f"total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
