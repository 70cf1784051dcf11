"""The one training loop: nothing else in the package calls backward() or steps an optimiser; the
methods that train (DCP's fine-tunes, Synaptic Strength) run on it; the schedule inside the loop
lands exactly on its target; a CNN recovers end to end through optimize and compile."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import tilefx
from tilefx.passes.analysis.block_selection import num_pruned_blocks
from tilefx.passes.metadata import BlockSparsity, get_metadata
from tilefx.passes.training.calibration import Calibration
from tilefx.passes.training.gradual_pruning import GradualBlockPruning, MaskedWeight
from tilefx.passes.training.learned_strength import SynapticConv2d, SynapticStrengthHook
from tilefx.passes.training.loop import LoopHook, LoopOptions, train
from tilefx.passes.training.sparsity_schedule import SparsitySchedule

ROOT = Path(__file__).resolve().parents[2]
TRAINING = re.compile(r"\bbackward\(|autograd\.backward|\boptimi[sz]er\.step\(|\bopt\.step\(")


def test_only_the_loop_calls_backward_or_steps_an_optimizer() -> None:
    loop = ROOT / "tilefx" / "passes" / "training" / "loop.py"
    offenders = []
    for path in sorted((ROOT / "tilefx").rglob("*.py")):
        if path == loop:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if TRAINING.search(code):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
    assert TRAINING.search(loop.read_text())  # the pattern does find the loop's own call


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 16, 3),
    )  # fmt: skip


def _data() -> Calibration:
    generator = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(4):
        x = torch.randn(8, 2, 4, 4, generator=generator)
        batches.append((x, (x[:, 0].sum((1, 2)) > 0).long() + (x[:, 1].sum((1, 2)) > 0).long()))
    return Calibration(batches)


def test_synaptic_strength_penalty_and_fixed_mask_run_as_loop_hooks() -> None:
    method = SynapticStrengthHook(sparsity=0.6, penalty=1e-2, signed=False)
    model = method.prepare(_convnet())
    data = _data()
    before = float(method.regularizer(model).detach())

    def loss(m: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        return data.loss_of(m(*inputs), labels)

    options = LoopOptions(steps=8, lr=0.05, optimizer="sgd", decay="constant", progress=False)
    penalised = train(model, loss, data, options, [method.loop_hook(model)])
    assert float(method.regularizer(model).detach()) < before  # λ Σ|s| reached the loss
    layers = [m for m in model.modules() if isinstance(m, SynapticConv2d)]
    assert all(float(m.strength.min()) >= 0 for m in layers)  # signed=False: clamped after each step
    pruned = method.prune(model)
    train(model, loss, data, options, [method.loop_hook(model, penalise=False)])
    for m in layers:  # the optimiser stepped (momentum, no penalty) yet pruned strengths stay zero
        assert torch.count_nonzero(m.strength.detach()[m.mask == 0]) == 0
    assert sum(int((m.mask == 0).sum()) for m in layers) == pruned
    assert len(penalised.losses) == 8


def test_synaptic_strength_fit_gives_plain_convs_at_the_sparsity_and_leaves_the_input() -> None:
    model, data = _convnet(), _data()
    weights = [p.detach().clone() for p in model.parameters()]
    method = SynapticStrengthHook(sparsity=0.5, penalty=1e-3)
    options = LoopOptions(steps=4, lr=0.01, optimizer="sgd", progress=False)
    plain = method.fit(model, data, options, options)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and not any(isinstance(m, SynapticConv2d) for m in plain.modules())
    kernels = torch.cat([(m.weight.detach().flatten(2).abs().sum(2) == 0).flatten() for m in convs])
    assert int(kernels.sum()) == int(0.5 * kernels.numel())


# ---- the schedule inside the loop ---------------------------------------------------------------
class _Counts(LoopHook):
    """Dropped blocks of each weight after every optimiser step, and whether they are zeros."""

    def __init__(self, pruning: GradualBlockPruning) -> None:
        self.pruning, self.counts = pruning, []

    def after_step(self, step: int) -> None:
        for w in self.pruning.weights:
            dropped = ~self.pruning.record(w).element_mask(w.weight.shape)
            assert torch.count_nonzero(w.weight.detach()[dropped]) == 0
        self.counts.append([int((~self.pruning.masks[w.name]).sum()) for w in self.pruning.weights])


def test_the_loop_reaches_the_exact_block_count_at_the_schedule_end_and_holds_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    names, target, end = ("0.weight", "2.weight"), 0.7, 8  # end is not a multiple of every
    weights = [MaskedWeight(n, model.get_parameter(n), (8, 1), target) for n in names]
    pruning = GradualBlockPruning(weights, SparsitySchedule(target, end=end, every=3), "magnitude")
    counts = _Counts(pruning)
    generator = torch.Generator().manual_seed(1)
    data = Calibration([(torch.randn(8, 16, generator=generator), None) for _ in range(3)])

    def loss(m: nn.Module, inputs: tuple[torch.Tensor, ...], labels: None) -> torch.Tensor:
        return (m(*inputs) - inputs[0][:, :4]).pow(2).mean()

    train(model, loss, data, LoopOptions(steps=12, lr=1e-2, progress=False), [pruning, counts])
    schedule, blocks = pruning.schedule, [pruning.masks[n].numel() for n in names]
    for step, observed in enumerate(counts.counts):
        last_prune = max(p for p in range(step + 1) if schedule.prunes_at(p))
        assert observed == [num_pruned_blocks(b, schedule.at(last_prune)) for b in blocks], step
    assert counts.counts[end - 1] != counts.counts[end]  # the last move happens at `end` itself
    final = [math.floor(target * b) for b in blocks]
    assert all(step == final for step in counts.counts[end:])  # exactly the target, then held
    assert counts.counts == sorted(counts.counts)  # monotone


# ---- end to end on a small CNN ------------------------------------------------------------------
class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        )  # fmt: skip
        self.classifier = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "unlabeled"])
def test_cnn_recovery_through_optimize_and_compile(labelled: bool) -> None:
    torch.manual_seed(0)
    model = _SmallCNN().eval()
    generator = torch.Generator().manual_seed(3)
    images = [torch.randn(4, 1, 6, 6, generator=generator) for _ in range(4)]
    batches = [(x, (x.sum((1, 2, 3)) > 0).long() if labelled else None) for x in images]
    recovery = tilefx.Recovery(
        steps=8, lr=1e-3, every=2, progress=False, distill=None if labelled else "output"
    )
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(16, 1), sparsity=0.75), recovery=recovery)
    gm = tilefx.optimize(model, (images[0],), recipe, calibration=batches)
    pruned = {
        name: records[-1]
        for name, records in get_metadata(gm).params.items()
        if records and isinstance(records[-1], BlockSparsity)
    }
    assert set(pruned) == {"features.0.weight", "features.3.weight"}
    for name, record in pruned.items():
        weight = gm.get_parameter(name).detach()
        assert int((~record.mask).sum()) == math.floor(0.75 * record.mask.numel())
        assert torch.count_nonzero(weight[~record.element_mask(weight.shape)]) == 0
    compiled = tilefx.compile(gm, target="llvm", fallback="never")
    with torch.no_grad():
        torch.testing.assert_close(compiled(images[1]), gm(images[1]), rtol=1e-4, atol=1e-4)
