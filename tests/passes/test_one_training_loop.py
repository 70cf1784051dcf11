"""The one training loop: nothing else in the package calls backward() or steps an optimiser, and
the methods that train (DCP's fine-tunes, Synaptic Strength) run on it."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from tilefx.passes.training.calibration import Calibration
from tilefx.passes.training.learned_strength import SynapticConv2d, SynapticStrengthHook
from tilefx.passes.training.loop import LoopOptions, train

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ("tilefx", "passes", "lowering", "runtime")
TRAINING = re.compile(r"\bbackward\(|autograd\.backward|\boptimi[sz]er\.step\(|\bopt\.step\(")


def test_only_the_loop_calls_backward_or_steps_an_optimizer() -> None:
    loop = ROOT / "passes" / "training" / "loop.py"
    offenders = []
    for top in PACKAGE:
        for path in sorted((ROOT / top).rglob("*.py")):
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
