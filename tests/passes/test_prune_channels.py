"""PruneChannelsPass and the coupled-channel analysis: golden shapes, numerics, contract."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from tests.models import randomize_bn, tiny_bert
from tilefx.errors import RecipeError, UnsupportedOpError
from tilefx.graph_capture import capture
from tilefx.passes.analysis.channel_groups import ChannelGroupsAnalysis
from tilefx.passes.cleanup import EliminateDeadCodePass
from tilefx.passes.fold_batchnorm import FoldBatchNormPass
from tilefx.passes.infra import AnalysisManager, PassManager
from tilefx.passes.metadata import ChannelSelection, get_metadata
from tilefx.passes.prune_channels import PruneChannelsPass


def _prune(model: nn.Module, x: torch.Tensor, **options: object) -> torch.fx.GraphModule:
    passes = [
        FoldBatchNormPass(),
        EliminateDeadCodePass(),
        PruneChannelsPass(**options),
        EliminateDeadCodePass(),
    ]  # type: ignore[arg-type]
    gm = PassManager(passes).run(capture(model.eval(), (x,)), (x,)).graph_module
    assert gm(x).shape == model(x).shape
    return gm


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def test_chain_matches_hand_masked_model_and_keeps_highest_l1_filters() -> None:
    model = Chain().eval()
    x = torch.randn(2, 3, 6, 6)
    gm = _prune(model, x, ratio=0.5)
    l1 = model.conv1.weight.detach().abs().sum(dim=(1, 2, 3))
    kept = torch.sort(torch.argsort(l1, descending=True)[:4]).values
    assert gm.get_parameter("conv1.weight").shape == (4, 3, 3, 3)
    assert gm.get_parameter("conv2.weight").shape == (4, 4, 1, 1)
    assert get_metadata(gm).of("conv1.weight", ChannelSelection)[0].kept == tuple(kept.tolist())
    masked = Chain().eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        drop = torch.ones(8, dtype=torch.bool)
        drop[kept] = False
        masked.conv1.weight[drop] = 0
        masked.conv1.bias[drop] = 0
    torch.testing.assert_close(gm(x), masked(x), rtol=1e-5, atol=1e-5)


class Residual(nn.Module):
    """Two branches added: their output channels are one group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Sequential(
            nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 1)
        )
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(y + self.a(y))
        return self.head(y.mean((2, 3)))


def test_residual_add_couples_stem_and_branch_output() -> None:
    model = randomize_bn(Residual()).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = _prune(model, x, ratio=0.5)
    assert gm.get_parameter("stem.weight").shape[0] == gm.get_parameter("a.3.weight").shape[0] == 4
    assert gm.get_parameter("head.weight").shape == (5, 4)
    assert gm.get_parameter("a.0.weight").shape[0] == 3


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1))


def test_concat_slices_consumer_input_at_the_right_offsets() -> None:
    model = Concat().eval()
    x = torch.randn(1, 3, 5, 5)
    gm = _prune(model, x, ratio=0.5)
    assert (
        gm.get_parameter("c.weight").shape[1]
        == gm.get_parameter("a.weight").shape[0] + gm.get_parameter("b.weight").shape[0]
        == 5
    )


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.grouped(torch.relu(self.depthwise(self.expand(x)))))


def test_depthwise_follows_its_input_and_grouped_conv_shrinks_per_group() -> None:
    model = Grouped().eval()
    x = torch.randn(1, 3, 6, 6)
    gm = _prune(model, x, ratio=0.5)
    depthwise = next(n for n in gm.graph.nodes if n.name == "conv2d_1")
    assert (
        gm.get_parameter("depthwise.weight").shape[0]
        == depthwise.args[6]
        == gm.get_parameter("expand.weight").shape[0]
    )
    assert gm.get_parameter("grouped.weight").shape[1] * 2 == gm.get_parameter("depthwise.weight").shape[0]
    assert gm.get_parameter("grouped.weight").shape[0] % 2 == 0


class FlattenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def test_flatten_expands_each_channel_over_height_times_width() -> None:
    model = FlattenHead().eval()
    x = torch.randn(2, 3, 4, 4)
    gm = _prune(model, x, ratio=0.5)
    assert gm.get_parameter("fc.weight").shape == (3, 2 * 2 * 2)


def test_bert_attention_prunes_head_dims_consistently(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_bert()
    ids = torch.randint(0, 50, (2, 7))
    with caplog.at_level(logging.INFO, logger="tilefx.passes.prune_channels"):
        gm = PassManager([PruneChannelsPass(ratio=0.5)]).run(capture(model, (ids,)), (ids,)).graph_module
    assert "32 units: node 'layer_norm': layer norm statistics span these channels" in caplog.text
    query = gm.get_parameter("encoder.layer.0.attention.self.query.weight")
    key = gm.get_parameter("encoder.layer.0.attention.self.key.weight")
    assert query.shape == key.shape == (16, 32)  # 4 heads x 4 of 8 head dims; hidden (layer norm) frozen
    assert gm.get_parameter("encoder.layer.0.intermediate.dense.weight").shape == (32, 32)


def test_bert_attention_can_prune_whole_heads() -> None:
    model = tiny_bert()
    ids = torch.randint(0, 50, (2, 7))
    gm = (
        PassManager([PruneChannelsPass(ratio=0.5, attention="heads")])
        .run(capture(model, (ids,)), (ids,))
        .graph_module
    )
    kept = get_metadata(gm).of("encoder.layer.0.attention.self.value.weight", ChannelSelection)[0].kept
    heads = sorted({k // 8 for k in kept})
    assert len(heads) == 2 and kept == tuple(h * 8 + d for h in heads for d in range(8))  # two whole heads
    views = [
        n.args[1] for n in gm.graph.nodes if n.target == torch.ops.aten.view.default and len(n.args[1]) == 4
    ]
    assert views and all(v[3] == 8 for v in views)  # head size kept; the head count (-1) is inferred


def test_ratio_zero_reports_unmodified_and_bad_ratio_is_rejected() -> None:
    model = Chain()
    x = torch.randn(1, 3, 4, 4)
    result = PassManager([PruneChannelsPass(ratio=0.0)]).run(capture(model, (x,)), (x,))
    assert not result.modified
    with pytest.raises(RecipeError, match="ratio"):
        PruneChannelsPass(ratio=1.0)


def test_never_prunes_a_group_to_zero() -> None:
    model = Chain()
    x = torch.randn(1, 3, 4, 4)
    gm = _prune(model, x, ratio=0.99)
    assert gm.get_parameter("conv1.weight").shape[0] == 1


def test_protected_parameters_keep_their_channels() -> None:
    model = Chain()
    x = torch.randn(1, 3, 4, 4)
    gm = _prune(model, x, ratio=0.5, protect=("conv1",))
    assert gm.get_parameter("conv1.weight").shape == (8, 3, 3, 3)


def test_round_to_keeps_multiples() -> None:
    model = Chain()
    x = torch.randn(1, 3, 4, 4)
    gm = _prune(model, x, ratio=0.7, round_to=4)
    assert gm.get_parameter("conv1.weight").shape[0] == 4


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.bessel_j0(self.conv(x))


def test_unknown_op_names_the_node_and_skip_freezes_it() -> None:
    x = torch.randn(1, 3, 4, 4)
    gm = capture(Unknown(), (x,))
    with pytest.raises(UnsupportedOpError, match="special_bessel_j0") as info:
        ChannelGroupsAnalysis().run(gm, AnalysisManager(gm, (x,)))
    assert "Recipe(skip=" in str(info.value)
    groups = ChannelGroupsAnalysis(skip=("aten.special_bessel_j0",)).run(gm, AnalysisManager(gm, (x,)))
    assert all(g.frozen for g in groups.groups)
    conv_out = next(g for g in groups.groups if any(s.role == "out" for s in g.slices))
    assert "Recipe.skip" in (conv_out.reason or "")


def test_global_scope_removes_the_requested_fraction_overall() -> None:
    model = Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = _prune(model, x, ratio=0.5, scope="global")
    assert gm.get_parameter("stem.weight").shape[0] + gm.get_parameter("a.0.weight").shape[0] == 7
