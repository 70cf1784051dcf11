"""Every channel criterion through ``tilefx.optimize``: verified, shrunk, input model untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tilefx
from tests.models import Informative, informative_data, randomize_bn
from tilefx.errors import RecipeError
from tilefx.passes.analysis.channel_groups import ChannelGroupsAnalysis
from tilefx.passes.fold_batchnorm import FoldBatchNormPass
from tilefx.passes.metadata import ChannelSelection, get_metadata
from tilefx.passes.prune_channels import PruneChannelsPass
from tilefx.pipeline import default_pipeline


def _cnn() -> nn.Module:
    return randomize_bn(
        nn.Sequential(
            nn.Conv2d(2, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        )  # fmt: skip
    ).eval()


CALIBRATION = [(torch.randn(16, 2, 6, 6), torch.randint(0, 3, (16,))) for _ in range(2)]


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "taylor", "dcp"])
def test_each_criterion_prunes_a_verified_smaller_model(criterion: str) -> None:
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 2, 6, 6)
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5, criterion=criterion))  # type: ignore[arg-type]
    pruned = tilefx.optimize(model, (x,), recipe=recipe, calibration=CALIBRATION)
    assert pruned(x).shape == (2, 3)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bn_scale_prunes_before_folding_and_the_others_after() -> None:
    def kinds(criterion: str) -> list[type]:
        recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(criterion=criterion))  # type: ignore[arg-type]
        return [type(p) for p in default_pipeline(recipe, CALIBRATION)]

    scale, l1 = kinds("bn_scale"), kinds("l1")
    assert scale.index(PruneChannelsPass) < scale.index(FoldBatchNormPass)
    assert l1.index(FoldBatchNormPass) < l1.index(PruneChannelsPass)


@pytest.mark.parametrize("criterion", ["taylor", "dcp"])
def test_data_driven_criteria_without_calibration_fail_before_any_work(criterion: str) -> None:
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(criterion=criterion))  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="needs calibration data"):
        tilefx.optimize(_cnn(), (torch.randn(1, 2, 6, 6),), recipe=recipe)


def test_dcp_scores_decide_which_channels_the_pass_keeps() -> None:
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5, criterion="dcp"))
    pruned = tilefx.optimize(
        Informative().eval(), (torch.randn(2, 2, 4, 4),), recipe=recipe, calibration=informative_data()
    )
    (selection,) = get_metadata(pruned).of("conv1.weight", ChannelSelection)
    assert selection.dim == 0 and selection.kept == (0, 1, 2, 3)


def test_scores_are_computed_on_the_same_groups_the_pass_prunes() -> None:
    recipe = tilefx.Recipe(
        channels=tilefx.ChannelPruning(criterion="taylor", protect=("fc",), attention="heads"),
        skip=("aten.cumsum",),
    )
    (prune,) = [p for p in default_pipeline(recipe, CALIBRATION) if isinstance(p, PruneChannelsPass)]
    assert prune.scores.groups == ChannelGroupsAnalysis(("aten.cumsum",), ("fc",), "heads")
