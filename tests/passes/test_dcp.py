"""DCP: greedy discrimination-aware selection picks informative channels; stopping; determinism."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import tilefx
from tests.models import Informative, informative_data
from tests.passes.chain_groups import chain_groups
from tilefx.errors import RecipeError
from tilefx.graph_capture import capture
from tilefx.passes.analysis.importance import score_groups
from tilefx.passes.criteria import CriterionOptions
from tilefx.passes.criteria.dcp import DCPOptions, dcp_scores
from tilefx.passes.training.calibration import Calibration


@pytest.fixture
def gm() -> torch.fx.GraphModule:
    return capture(Informative().eval(), (torch.randn(2, 2, 4, 4),))


def _conv1_group(gm: torch.fx.GraphModule) -> object:
    return chain_groups(gm).groups[0]


FAST = DCPOptions(aux_epochs=1, num_losses=1)


@pytest.mark.parametrize("variant", [FAST, dataclasses.replace(FAST, aux="paper", importance="paper")])
def test_dcp_keeps_the_informative_channels_that_l1_would_drop(
    gm: torch.fx.GraphModule, variant: DCPOptions
) -> None:
    group = _conv1_group(gm)
    result = dcp_scores(gm, chain_groups(gm).prunable(), informative_data(), variant)
    assert set(result.order[group.id]) == {0, 1, 2, 3}  # type: ignore[attr-defined]
    scores = result.scores[group.id]  # type: ignore[attr-defined]
    assert scores[:4].min() >= 1 > scores[4:].max()
    l1 = score_groups(gm, chain_groups(gm), "l1").scores[group.id]  # type: ignore[attr-defined]
    assert set(torch.topk(l1, 4).indices.tolist()) == {4, 5, 6, 7}


def test_fixed_rate_stops_at_floor_of_rate_times_units(gm: torch.fx.GraphModule) -> None:
    groups = chain_groups(gm).prunable()
    for rate, kept in ((0.5, 4), (0.3, 6), (0.9, 1), (0.0, 8)):
        result = dcp_scores(
            gm, groups, informative_data(1), dataclasses.replace(FAST, rate=rate, aux_epochs=0)
        )
        assert len(result.order[0]) == kept
        assert len(result.losses[0]) == kept + 1


def test_epsilon_stops_when_the_relative_loss_change_is_small(gm: torch.fx.GraphModule) -> None:
    groups = chain_groups(gm).prunable()
    loose = dcp_scores(gm, groups, informative_data(1), dataclasses.replace(FAST, epsilon=0.5, aux_epochs=0))
    tight = dcp_scores(gm, groups, informative_data(1), dataclasses.replace(FAST, epsilon=1e-9, aux_epochs=0))
    losses = loose.losses[0]
    assert abs(losses[-2] - losses[-1]) / losses[0] <= 0.5
    assert all(abs(a - b) / losses[0] > 0.5 for a, b in zip(losses[:-2], losses[1:-1], strict=True))
    assert len(loose.order[0]) < len(tight.order[0]) == 8


def test_dcp_is_deterministic_and_leaves_the_model_unchanged(gm: torch.fx.GraphModule) -> None:
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    groups = chain_groups(gm).prunable()
    first = dcp_scores(gm, groups, informative_data(), FAST)
    second = dcp_scores(gm, groups, informative_data(), FAST)
    for gid, scores in first.scores.items():
        assert torch.equal(scores, second.scores[gid])
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    weight = first.weights["conv2.weight"]
    assert weight[:, 4:].abs().sum() == 0 and weight[:, :4].abs().sum() > 0


def test_groups_without_one_dense_consumer_fall_back_or_refuse() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4, 2)
    )
    gm = capture(model.eval(), (torch.randn(2, 2, 3, 3),))
    groups = chain_groups(gm).prunable()  # conv → depthwise conv: not a DCP layer
    data = Calibration([(torch.randn(4, 2, 3, 3), torch.tensor([0, 1, 0, 1]))])
    result = dcp_scores(gm, groups, data, dataclasses.replace(FAST, aux_epochs=0))
    assert result.fallback == (0,)
    with pytest.raises(RecipeError, match="cannot select"):
        dcp_scores(gm, groups, data, dataclasses.replace(FAST, fallback="error"))


def test_options_are_validated() -> None:
    with pytest.raises(RecipeError, match="rate"):
        DCPOptions(rate=1.0)
    with pytest.raises(RecipeError, match="epsilon"):
        DCPOptions(epsilon=0.0)


class _Reshuffling:
    """A re-iterable that yields its batches in a different order on every pass (like a DataLoader)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches, self.passes = batches, 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.passes += 1
        order = (
            self.batches[self.passes % len(self.batches) :] + self.batches[: self.passes % len(self.batches)]
        )
        return iter(order)


def test_selection_data_is_read_once_so_shuffling_loaders_keep_targets_aligned(
    gm: torch.fx.GraphModule,
) -> None:
    batches = list(informative_data())
    loader = _Reshuffling(batches)
    result = dcp_scores(gm, chain_groups(gm).prunable(), Calibration(loader), FAST)
    assert loader.passes == 1
    assert set(result.order[0]) == {0, 1, 2, 3}


def _kept_widths(epsilon: float | None) -> tuple[int, int]:
    options = {"aux_epochs": 0, "num_losses": 1} | ({} if epsilon is None else {"epsilon": epsilon})
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5, criterion="dcp", options=options))
    x = torch.randn(2, 2, 4, 4)
    pruned = tilefx.optimize(Informative().eval(), (x,), recipe=recipe, calibration=informative_data(1))
    in_conv2, in_fc = (
        pruned.get_parameter("conv2.weight").shape[1],
        pruned.get_parameter("fc.weight").shape[1],
    )
    return in_conv2, in_fc


def test_dcp_adapt_through_the_recipe_keeps_what_dcp_selected() -> None:
    assert _kept_widths(None) == (4, 2)  # fixed rate: the recipe's ratio
    assert _kept_widths(1e-9) == (8, 4)  # ε so small that DCP-Adapt selects every unit: nothing goes
    loose = _kept_widths(0.5)
    assert loose[0] < 4 and loose[1] < 2  # stops early: keeps fewer than the ratio would


def test_the_catalogue_lists_every_criterion_without_other_imports() -> None:
    """The catalogue is data in one module, not registrations that depend on what was imported."""
    code = "from tilefx.passes.criteria import criteria; print(criteria(), criteria(public=True))"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    everything, public = shown.stdout.strip().split(") (")
    assert "'dcp'" in public and "'vrpge'" in public and "'taylor'" in public
    assert "'zeroed_filters'" in everything and "'zeroed_filters'" not in public


def test_the_dcp_criterion_takes_dcp_options(gm: torch.fx.GraphModule) -> None:
    with pytest.raises(RecipeError, match='criterion "dcp" takes DCPOptions'):
        score_groups(gm, chain_groups(gm), "dcp", informative_data(1), options=CriterionOptions())


def test_recipe_dcp_options_are_checked() -> None:
    with pytest.raises(RecipeError, match="did you mean 'epsilon'"):
        tilefx.ChannelPruning(criterion="dcp", options={"epsilom": 0.1})
    with pytest.raises(RecipeError, match="criterion='l1' takes no options"):
        tilefx.ChannelPruning(criterion="l1", options=tilefx.DCPOptions())
    recipe = tilefx.Recipe.from_dict(
        {"channels": {"criterion": "dcp", "options": {"aux": "paper", "solver": {"lr": 0.1}}}}
    )
    options = recipe.channels.options if recipe.channels is not None else None
    assert isinstance(options, tilefx.DCPOptions) and options.aux == "paper" and options.solver.lr == 0.1
