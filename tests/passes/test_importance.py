"""Channel criteria: magnitude and BN scale by hand, Taylor against autograd, the analysis contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.passes.chain_groups import chain_groups
from tilefx.errors import RecipeError
from tilefx.graph_capture import capture
from tilefx.passes.analysis.channel_groups import ChannelGroup, ChannelGroups, ParamSlice
from tilefx.passes.analysis.importance import ChannelImportance, score_groups
from tilefx.passes.infra.analysis_manager import Analysis, AnalysisManager
from tilefx.passes.training.calibration import Calibration


class ChainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 4, 1)
        self.b2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def net() -> ChainNet:
    model = ChainNet().eval()
    with torch.no_grad():
        for bn in (model.b1, model.b2):
            bn.weight.uniform_(-2, 2)
            bn.running_var.uniform_(0.5, 2)
    return model


def _gm(model: nn.Module) -> torch.fx.GraphModule:
    return capture(model, (torch.randn(2, 2, 5, 5),))


def _group(slices: list[ParamSlice], units: int) -> ChannelGroups:
    return ChannelGroups((ChannelGroup(0, units, tuple(slices), ("n",)),), trace=None, roots=())  # type: ignore[arg-type]


def test_l1_and_l2_sum_each_units_out_slices_by_hand() -> None:
    gm = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
    a = torch.arange(24.0).reshape(4, 6) - 10  # units are pairs of rows: {0, 2}, {1, 3}
    b = torch.arange(12.0).reshape(3, 4) * -1  # units are columns 3 and 0
    gm.register_parameter("a", nn.Parameter(a))
    gm.register_parameter("b", nn.Parameter(b))
    groups = _group(
        [
            ParamSlice("a", 0, np.array([[0, 2], [1, 3]]), "out"),
            ParamSlice("b", 1, np.array([[3], [0]]), "out"),
            ParamSlice("b", 0, np.array([[0], [1]]), "in"),  # ignored: not an out slice
        ],
        2,
    )
    l1 = score_groups(gm, groups, "l1").scores[0]
    l2 = score_groups(gm, groups, "l2").scores[0]
    expect_l1 = [a[[0, 2]].abs().sum() + b[:, 3].abs().sum(), a[[1, 3]].abs().sum() + b[:, 0].abs().sum()]
    expect_l2 = [a[[0, 2]].norm() + b[:, 3].norm(), a[[1, 3]].norm() + b[:, 0].norm()]
    torch.testing.assert_close(l1, torch.tensor(expect_l1, dtype=torch.float64))
    torch.testing.assert_close(l2, torch.tensor(expect_l2, dtype=torch.float64))


def test_group_without_out_slice_is_scored_on_all_slices() -> None:
    gm = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
    gm.register_parameter("w", nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, 4.0]])))
    groups = _group([ParamSlice("w", 1, np.array([[0], [1]]), "in")], 2)
    torch.testing.assert_close(score_groups(gm, groups, "l1").scores[0], torch.tensor([4.0, 6.0]).double())


def test_bn_scale_is_abs_gamma_and_needs_a_batch_norm(net: ChainNet) -> None:
    gm = _gm(net)
    groups = chain_groups(gm)
    scores = score_groups(gm, groups, "bn_scale").scores
    torch.testing.assert_close(scores[0], net.b1.weight.detach().abs().double())
    torch.testing.assert_close(scores[1], net.b2.weight.detach().abs().double())
    folded = _gm(nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.Conv2d(3, 2, 1)))
    with pytest.raises(RecipeError, match="has no batch norm.*FoldBatchNormPass"):
        score_groups(folded, chain_groups(folded), "bn_scale")


@pytest.mark.parametrize("reduction", ["group", "slice"])
def test_taylor_matches_autograd_on_the_module(net: ChainNet, reduction: str) -> None:
    gm = _gm(net)
    groups = chain_groups(gm)
    batches = [(torch.randn(8, 2, 5, 5), torch.randint(0, 3, (8,))) for _ in range(2)]
    scores = score_groups(gm, groups, "taylor", batches, reduction=reduction).scores  # type: ignore[arg-type]
    expected = torch.zeros(6, dtype=torch.float64)
    for x, y in batches:
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        per_slice = [
            (net.c1.weight * net.c1.weight.grad).sum((1, 2, 3)),
            net.c1.bias * net.c1.bias.grad,
            net.b1.weight * net.b1.weight.grad,
            net.b1.bias * net.b1.bias.grad,
            (net.c2.weight * net.c2.weight.grad).sum((0, 2, 3)),
        ]
        stacked = torch.stack(per_slice).double().detach()
        expected += stacked.sum(0).square() if reduction == "group" else stacked.square().sum(0)
    torch.testing.assert_close(scores[0], expected / 2, rtol=1e-5, atol=1e-12)


def test_taylor_needs_calibration_and_leaves_the_graph_alone(net: ChainNet) -> None:
    gm = _gm(net)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(RecipeError, match="needs calibration data"):
        score_groups(gm, chain_groups(gm), "taylor")
    with pytest.raises(RecipeError, match="pair"):
        score_groups(gm, chain_groups(gm), "taylor", [torch.randn(2, 2, 5, 5)])
    score_groups(gm, chain_groups(gm), "taylor", [(torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 2, 0]))])
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    assert all(p.grad is None for p in gm.parameters())


class _HandGroups(Analysis[ChannelGroups]):
    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> ChannelGroups:
        return chain_groups(gm)

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _HandGroups)


def test_channel_importance_is_a_cached_analysis_keyed_by_calibration_identity(net: ChainNet) -> None:
    gm = _gm(net)
    am = AnalysisManager(gm)
    batch = [(torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 2, 0]))]
    first, second = Calibration(batch), Calibration(list(batch))
    l1 = am.get(ChannelImportance(_HandGroups(), "l1"))
    assert am.get(ChannelImportance(_HandGroups(), "l1")) is l1
    a = am.get(ChannelImportance(_HandGroups(), "taylor", first))
    b = am.get(ChannelImportance(_HandGroups(), "taylor", second))
    assert a is not b
    torch.testing.assert_close(a.scores[0], b.scores[0])
    assert set(l1.scores) == {0, 1} and l1.of(chain_groups(gm).groups[0]).shape == (6,)
    with pytest.raises(RecipeError, match="criterion"):
        ChannelImportance(_HandGroups(), "l3")


def test_an_unknown_criterion_names_the_registered_ones(net: ChainNet) -> None:
    gm = _gm(net)
    registered = r"'l1', 'l2', 'bn_scale', 'taylor', 'dcp', 'vrpge'"  # the catalogue's public names
    with pytest.raises(RecipeError, match=rf"unknown channel criterion 'l3'.*{registered}"):
        score_groups(gm, chain_groups(gm), "l3")
