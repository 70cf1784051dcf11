"""Recipe(speedup=...): units, the output-measured losses, and the choice made by verified passes."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn as nn

import tilefx
from tilefx.latency import LatencyTable, LayerShape
from tilefx.passes.analysis.channel_groups import ChannelGroupsAnalysis
from tilefx.passes.analysis.weight_layers import weight_layers
from tilefx.passes.infra import AnalysisManager, PassManager
from tilefx.passes.metadata import get_metadata
from tilefx.passes.recover_sparsity import RecoverSparsityPass
from tilefx.passes.search.apply import passes_for
from tilefx.passes.search.losses import Option, greedy_obs_order, output_damage, without_channels
from tilefx.passes.search.space import SpeedSearch
from tilefx.passes.search.units import search_units
from tilefx.passes.training.calibration import Calibration
from tilefx.passes.training.reconstruct import input_gram
from tilefx.speed_target import search_pipeline


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 64), nn.Linear(64, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _batches(count: int) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(32, 16, generator=generator),) for _ in range(count)]


def _graph() -> tuple[torch.fx.GraphModule, list[Any]]:
    torch.manual_seed(0)
    gm = tilefx.capture(Tower().eval(), _batches(1)[0])
    return gm, list(weight_layers(gm))


class FakeLatency(LatencyTable):
    """Milliseconds by formula: dense ∝ MACs, int8 three times faster, blocks by their density."""

    def __init__(self) -> None:
        super().__init__(cache=None)

    def ms(self, shape: LayerShape, option: Option) -> float:
        dense = shape.rows * shape.k * shape.n * 1e-6
        time = dense / (3.0 if option.format == "int8" else 1.0)
        return time * (1 - option.sparsity) if option.block is not None else time

    def model_ms(self, model: torch.nn.Module, inputs: Any) -> float:
        return 1.1 * sum(32 * k * n * 1e-6 for k, n in ((16, 64), (64, 32), (32, 16)))


def test_units_partition_the_layers_and_a_channel_unit_owns_its_producer_and_consumer() -> None:
    gm, layers = _graph()
    am = AnalysisManager(gm, _batches(1)[0])
    units = search_units(am.get(ChannelGroupsAnalysis()), layers)
    owned = [p for u in units for p in u.layers]
    assert sorted(owned) == sorted(layer.param for layer in layers) and len(owned) == len(set(owned))
    first = units[0]
    assert first.structured and first.producers == ("fc1.weight",) and first.consumer == "fc2.weight"
    assert first.channels == 64 and first.columns[5] == (5,) and first.rows["fc1.weight"][5] == (5,)


def test_the_loss_of_removing_channels_is_measured_on_what_removing_them_makes() -> None:
    """Zeroing the dropped producer rows and refitting the consumer (the search's estimate) computes
    what physical removal + RefitConsumersPass computes."""
    gm, layers = _graph()
    batches = _batches(6)
    am = AnalysisManager(gm, batches[0])
    units = search_units(am.get(ChannelGroupsAnalysis()), layers)
    unit, by_param = units[0], {layer.param: layer for layer in layers}
    h = input_gram(gm, by_param["fc2.weight"], batches, None)
    order = greedy_obs_order(gm, unit, by_param["fc2.weight"], h, 0.5)
    assert sorted(order) == list(range(64)) and len(set(order[:32])) == 32
    estimate = without_channels(gm, unit, by_param, order[:24], h)
    chosen = {u.name: Option(keep=0.625) if u is unit else Option() for u in units}
    made = PassManager(
        passes_for(units, chosen, {unit.name: order}, Calibration([(b, None) for b in batches]), 6)
    )
    physical = made.run(gm, batches[0]).graph_module
    assert physical.get_parameter("fc1.weight").shape == (40, 16)
    x = batches[0][0]
    torch.testing.assert_close(physical(x), estimate(x), rtol=2e-3, atol=2e-3)
    dense = [gm(*b) for b in batches[4:]]
    assert (
        0
        < output_damage(estimate, batches[4:], dense)
        < output_damage(without_channels(gm, unit, by_param, order[:48], h), batches[4:], dense)
    )


def test_the_search_meets_its_budget_with_the_least_damage_and_makes_its_choice() -> None:
    gm, _ = _graph()
    data = Calibration([(b, None) for b in _batches(10)])
    search = SpeedSearch(calibration_batches=6, check_batches=2, rounds=1, progress=False)
    fake = FakeLatency()
    result, report = search_pipeline(
        gm,
        _batches(1)[0],
        data,
        speedup=2.0,
        quality=None,
        search=search,
        latency=fake,
        measure=lambda g: 2.0,
    )
    assert report.predicted >= 2.0 - 1e-9 and report.measured == (2.0,)
    assert 0 < report.estimated_quality <= 1
    out = result.graph_module
    x = _batches(1)[0][0]
    assert out(x).shape == (32, 16) and math.isfinite(float(out(x).abs().sum()))
    loose = search_pipeline(
        gm,
        _batches(1)[0],
        data,
        speedup=1.05,
        quality=None,
        search=search,
        latency=fake,
        measure=lambda g: 1.05,
    )[1]
    assert loose.estimated_quality >= report.estimated_quality  # more time never costs quality


def test_recovery_after_the_search_trains_before_the_number_formats() -> None:
    """Training moves weights off an int8 grid, so the search's formats come after its tail."""
    gm, _ = _graph()
    data = Calibration([(b, None) for b in _batches(10)])
    search = SpeedSearch(
        keeps=(1.0,), blocks=(), calibration_batches=6, check_batches=2, rounds=1, progress=False
    )
    recovery = tilefx.Recovery(steps=3, check_batches=0, progress=False)
    result, report = search_pipeline(
        gm,
        _batches(1)[0],
        data,
        speedup=2.5,
        quality=None,
        search=search,
        tail=[RecoverSparsityPass(recovery, data)],
        latency=FakeLatency(),  # int8 three times faster: every layer takes it
        measure=lambda g: 2.5,
    )
    assert set(report.chosen.values()) == {"int8"}
    ran = [name for name, _ in result.ran]
    assert ran.index("RecoverSparsityPass") < ran.index("QuantizeLinearsPass")
    assert get_metadata(result.graph_module).recovery_losses  # it trained


def test_an_overshoot_loosens_the_budget_and_keeps_the_round_with_least_damage() -> None:
    """Measured far above the target, the search gives time back for quality; a round that then
    falls short is not returned while an earlier one met the target."""
    gm, _ = _graph()
    data = Calibration([(b, None) for b in _batches(10)])
    search = SpeedSearch(calibration_batches=6, check_batches=2, rounds=3, progress=False)

    def run(speeds: list[float]) -> tuple[tuple[float, ...], float]:
        _, report = search_pipeline(gm, _batches(1)[0], data, speedup=2.0, quality=None, search=search,
                                    latency=FakeLatency(), measure=lambda g: speeds.pop(0))  # fmt: skip
        return report.measured, report.estimated_quality

    (first,), on_target = run([2.0])
    assert first == 2.0
    measured, loosened = run([8.0, 2.05])
    assert measured == (8.0, 2.05) and loosened > on_target  # more time, less damage
    measured, kept = run([8.0, 1.5])
    assert measured == (8.0, 1.5) and kept == on_target  # the short round is dropped


def test_a_target_the_model_calls_out_of_reach_but_the_measurement_meets_loosens_the_budget() -> None:
    """The latency table is timed on a shared machine and can be pessimistic: the fastest choice,
    taken because the target looked out of reach, measured on target; the search then spends the
    model's error on quality instead of returning the most damaging choice."""
    gm, _ = _graph()
    data = Calibration([(b, None) for b in _batches(10)])
    search = SpeedSearch(calibration_batches=6, check_batches=2, rounds=3, progress=False)

    def run(target: float, speeds: list[float]) -> tuple[tuple[float, ...], float, float]:
        _, report = search_pipeline(gm, _batches(1)[0], data, speedup=target, quality=None, search=search,
                                    latency=FakeLatency(), measure=lambda g: speeds.pop(0))  # fmt: skip
        return report.measured, report.estimated_quality, report.predicted

    _, fastest_quality, reach = run(50.0, [1.0])  # far beyond the options: the fastest, once
    target = 1.5 * reach  # beyond what the model predicts for the fastest choice ...
    fast = 1.2 * target  # ... which measures faster still: the model was 1.8x pessimistic
    measured, quality, _ = run(target, [fast, target])
    assert measured == (fast, target) and quality > fastest_quality  # a second, gentler round
    measured, quality, _ = run(target, [fast, 0.5 * target])
    assert measured == (fast, 0.5 * target) and quality == fastest_quality  # it fell short: the first


def test_the_quality_dual_takes_the_fastest_choice_above_the_floor() -> None:
    gm, _ = _graph()
    data = Calibration([(b, None) for b in _batches(10)])
    search = SpeedSearch(calibration_batches=6, check_batches=2, rounds=1, progress=False)
    _, strict = search_pipeline(gm, _batches(1)[0], data, speedup=None, quality=0.999, search=search,
                                latency=FakeLatency(), measure=lambda g: 1.0)  # fmt: skip
    _, loose = search_pipeline(gm, _batches(1)[0], data, speedup=None, quality=0.9, search=search,
                               latency=FakeLatency(), measure=lambda g: 1.0)  # fmt: skip
    assert strict.estimated_quality >= 0.999 - 1e-9 and loose.estimated_quality >= 0.9 - 1e-9
    assert loose.predicted >= strict.predicted


def test_speed_recipes_are_checked() -> None:
    with pytest.raises(tilefx.RecipeError, match="give one"):
        tilefx.Recipe(speedup=2.0, quality=0.9)
    with pytest.raises(tilefx.RecipeError, match="searches what blocks"):
        tilefx.Recipe(speedup=2.0, blocks=tilefx.BlockPruning())
    with pytest.raises(tilefx.RecipeError, match="Recipe.speedup must be a number > 1"):
        tilefx.Recipe(speedup=0.5)
    with pytest.raises(tilefx.RecipeError, match="formats"):
        SpeedSearch(formats=("int4",))
    with pytest.raises(tilefx.RecipeError, match="calibration"):
        tilefx.optimize(Tower().eval(), _batches(1)[0], tilefx.Recipe(speedup=2.0))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


class ConvLatency(FakeLatency):
    def ms(self, shape: LayerShape, option: Option) -> float:
        return shape.rows * shape.k * shape.n * (64 if shape.conv else 1) * 1e-6

    def model_ms(self, model: torch.nn.Module, inputs: Any) -> float:
        return 1e-6 * 4 * (3 * 16 * 64 + 16 * 32 * 64 + 32 * 10)


def test_a_cnn_is_searched_over_its_channels_only() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 3, 8, 8, generator=generator),) for _ in range(8)]
    model = SmallCNN().eval()
    gm = tilefx.capture(model, batches[0])
    data = Calibration([(b, None) for b in batches])
    search = SpeedSearch(calibration_batches=5, check_batches=2, rounds=1, progress=False)
    result, report = search_pipeline(
        gm,
        batches[0],
        data,
        speedup=1.6,
        quality=None,
        search=search,
        latency=ConvLatency(),
        measure=lambda g: 1.6,
    )
    assert set(report.chosen.values()) <= {"fp32"} | {f"keep {k:.3g} fp32" for k in search.keeps}
    assert any(name.startswith("keep") for name in report.chosen.values())
    assert result.graph_module.get_parameter("conv1.weight").shape[0] < 16
