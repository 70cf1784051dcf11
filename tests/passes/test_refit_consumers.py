"""Structured pruning that refits and trains: channel pruning + least-squares refit of the layers
that lost inputs, then recovery against the unpruned model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tilefx
from tilefx.errors import PreconditionError
from tilefx.passes.metadata import ChannelSelection, get_metadata
from tilefx.passes.refit_consumers import RefitConsumersPass
from tilefx.passes.training.calibration import Calibration


class Tower(nn.Module):
    """Three linears; the hidden widths are what channel pruning removes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _inputs(batches: int = 6) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(16, 12, generator=generator) for _ in range(batches)]


def _data(batches: int = 6) -> Calibration:
    return Calibration([(x, None) for x in _inputs(batches)])


def _error(model: nn.Module, dense: nn.Module) -> float:
    with torch.no_grad():
        return sum(float((model(x) - dense(x)).pow(2).mean()) for x in _inputs())


def _hidden(gm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fc3's input, computed from the graph's own parameters."""
    p = gm.get_parameter
    h = torch.relu(x @ p("fc1.weight").T + p("fc1.bias"))
    return torch.relu(h @ p("fc2.weight").T + p("fc2.bias"))


def test_refit_solves_the_least_squares_problem_of_each_consumer() -> None:
    torch.manual_seed(0)
    dense, data = Tower().eval(), _data()
    x = _inputs()[0]
    plain = tilefx.optimize(dense, (x,), tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5)))
    refit = tilefx.optimize(
        dense, (x,), tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5, refit=6)), calibration=data
    )
    assert refit.get_parameter("fc2.weight").shape == plain.get_parameter("fc2.weight").shape == (16, 16)
    assert get_metadata(refit).of("fc3.weight", ChannelSelection)
    assert _error(refit, dense) < 0.5 * _error(plain, dense)

    # fc3, the last consumer, is at the least-squares optimum: the gradient of its squared error to
    # the dense fc3's output on the dense input vanishes (up to the 1% ridge damping), while the
    # unrefit weights are far from it
    def gradient(gm: torch.nn.Module) -> float:
        weight = gm.get_parameter("fc3.weight").detach().double().requires_grad_()
        bias = gm.get_parameter("fc3.bias").detach().double().requires_grad_()
        loss = sum(
            ((_hidden(gm, x).double() @ weight.T + bias) - dense.fc3(dense_hidden(x)).double()).pow(2).sum()
            for x in _inputs()
        )
        loss.backward()  # type: ignore[union-attr]
        return float(torch.cat([weight.grad.flatten(), bias.grad]).norm())  # type: ignore[union-attr]

    def dense_hidden(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(dense.fc2(torch.relu(dense.fc1(x))))

    assert gradient(refit) < 0.05 * gradient(plain)


def test_channel_pruning_with_refit_then_recovery_learns_from_the_unpruned_model() -> None:
    torch.manual_seed(0)
    dense, data = Tower().eval(), _data()
    x = _inputs()[0]
    refit_only = tilefx.optimize(
        dense, (x,), tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5, refit=6)), calibration=data
    )
    recovery = tilefx.Recovery(
        steps=60, lr=3e-3, distill="output", output_loss="mse", check_batches=0, progress=False
    )
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5, refit=6), recovery=recovery)
    trained = tilefx.optimize(dense, (x,), recipe, calibration=data)
    losses = get_metadata(trained).recovery_losses
    assert losses and losses[0] > 0  # the teacher is the unpruned model, not the pruned start
    assert trained.get_parameter("fc2.weight").shape == (16, 16)
    assert _error(trained, dense) < _error(refit_only, dense)


def test_refit_alone_has_no_teacher_and_says_so() -> None:
    dense, data = Tower().eval(), _data(2)
    x = _inputs()[0]
    pruned = tilefx.optimize(dense, (x,), tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5)))
    with pytest.raises(PreconditionError, match="unpruned model as its teacher"):
        RefitConsumersPass(data, batches=2)(pruned, example_inputs=(x,))


def test_refit_needs_calibration() -> None:
    with pytest.raises(tilefx.RecipeError, match="calibration"):
        tilefx.optimize(
            Tower().eval(), (torch.randn(4, 12),), tilefx.Recipe(channels=tilefx.ChannelPruning(refit=2))
        )


def test_a_held_out_check_returns_the_start_when_training_only_hurts() -> None:
    torch.manual_seed(0)
    dense, data = Tower().eval(), _data(8)
    x = _inputs()[0]
    start = tilefx.optimize(
        dense, (x,), tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5, refit=6)), calibration=data
    )
    harmful = tilefx.Recovery(  # a learning rate that wrecks a good refit within a few steps
        steps=20, lr=0.5, distill="output", output_loss="mse", warmup=0.0, progress=False
    )
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5, refit=6), recovery=harmful)
    wrecked = tilefx.optimize(dense, (x,), recipe, calibration=data)
    checked = tilefx.optimize(
        dense,
        (x,),
        tilefx.Recipe(
            channels=tilefx.ChannelPruning(ratio=0.5, refit=6),
            recovery=tilefx.Recovery(**{**harmful.__dict__, "check_batches": 2, "check_every": 5}),
        ),
        calibration=data,
    )
    assert _error(wrecked, dense) > 2 * _error(start, dense)
    for name, value in start.named_parameters():
        torch.testing.assert_close(checked.get_parameter(name), value, rtol=0, atol=0)


def test_a_held_out_check_keeps_training_that_helps() -> None:
    torch.manual_seed(0)
    dense, data = Tower().eval(), _data(8)
    x = _inputs()[0]
    recovery = tilefx.Recovery(
        steps=60,
        lr=3e-3,
        distill="output",
        output_loss="mse",
        check_batches=2,
        check_every=10,
        progress=False,
    )
    plain = tilefx.optimize(
        dense, (x,), tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5, refit=6)), calibration=data
    )
    trained = tilefx.optimize(
        dense,
        (x,),
        tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5, refit=6), recovery=recovery),
        calibration=data,
    )
    assert _error(trained, dense) < _error(plain, dense)
    with pytest.raises(tilefx.PassError, match="holds out every calibration batch"):
        tilefx.optimize(
            dense,
            (x,),
            tilefx.Recipe(recovery=tilefx.Recovery(steps=2, check_batches=8, progress=False)),
            calibration=data,
        )


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def test_the_teacher_of_a_refit_is_the_model_with_its_batch_norms_folded() -> None:
    """The consumer conv of a CNN gains a bias when its batch norm folds; the teacher it is refit
    to must be that folded conv (the same function), not the capture's conv before its norm."""
    torch.manual_seed(0)
    dense = ConvBN()
    with torch.no_grad():
        for bn in (dense.bn1, dense.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    dense = dense.eval()
    images = [torch.randn(4, 3, 8, 8) for _ in range(6)]
    data = [((x,), None) for x in images]
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5, refit=6))
    refit = tilefx.optimize(dense, (images[0],), recipe, calibration=data)
    plain = tilefx.optimize(dense, (images[0],), tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5)))
    assert refit.get_parameter("conv2.weight").shape == (8, 8, 3, 3)

    def error(model: nn.Module) -> float:
        with torch.no_grad():
            return sum(float((model(x) - dense(x)).norm() / dense(x).norm()) for x in images)

    assert error(refit) < 0.9 * error(plain)
