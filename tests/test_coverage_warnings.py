"""No silent no-ops: a block recipe or a compile that does less than asked says so, reasons grouped."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import pytest
import torch
import torch.nn as nn

import tilefx
from tests.models import ConvBN, randomize_bn
from tilefx.passes.coverage import warn_coverage
from tilefx.passes.metadata import BlockSparsity, get_metadata
from tilefx.passes.prune_channels import PruneChannelsPass

X = torch.randn(2, 3, 8, 8)


class Wide(nn.Module):
    """64 channels: pruning 30% keeps 45 (no 16-row block divides it) unless rounded to 48."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def _block_sparse(gm: torch.fx.GraphModule) -> set[str]:
    return {p for p, rs in get_metadata(gm).params.items() if any(isinstance(r, BlockSparsity) for r in rs)}


def test_block_pruning_that_leaves_layers_dense_warns_with_grouped_reasons() -> None:
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(16, 1), sparsity=0.5, reorder="none"))
    with pytest.warns(tilefx.CoverageWarning) as caught:
        gm = tilefx.optimize(randomize_bn(ConvBN()).eval(), (X,), recipe=recipe)
    assert [str(w.message) for w in caught if w.category is tilefx.CoverageWarning] == [
        "PruneBlocksPass(block=(16, 1)): 2 of 2 weight layers left dense: 2 because block (16, 1) does "
        "not divide their output channels (conv.weight 8x3, fc.weight 4x8). Pick a block that divides "
        "them, prune channels in the same Recipe (pruned channel counts then round to the block), or "
        "leave them out with a LayerSelection"
    ]
    assert not _block_sparse(gm)


def test_coverage_warning_counts_each_reason_and_names_the_first_few() -> None:
    left = [("reason a", f"layer{i}") for i in range(5)] + [("reason b", "other")]
    with pytest.warns(tilefx.CoverageWarning) as caught:
        warn_coverage("Subject", 9, "things left", left, "Fix it.")
    assert str(caught[0].message) == (
        "Subject: 6 of 9 things left: 5 because reason a (layer0, layer1, layer2, and 2 more); "
        "1 because reason b (other). Fix it."
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_coverage("Subject", 9, "things left", [], "Fix it.")  # nothing left: silent


def test_block_pruning_a_graph_without_weights_warns() -> None:
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(4, 1), reorder="none"))
    with pytest.warns(tilefx.CoverageWarning, match="no linear or conv weight"):
        tilefx.optimize(nn.ReLU(), (X,), recipe=recipe)


def test_channel_counts_are_rounded_to_the_block_so_every_layer_is_block_pruned() -> None:
    recipe = tilefx.Recipe(
        channels=tilefx.ChannelPruning(ratio=0.3),
        blocks=tilefx.BlockPruning(block=(16, 1), sparsity=0.5, reorder="none"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", tilefx.CoverageWarning)
        gm = tilefx.optimize(Wide().eval(), (X,), recipe=recipe)
    assert gm.get_parameter("conv1.weight").shape[0] == 48  # 45 kept by the ratio, rounded up
    assert _block_sparse(gm) == {"conv1.weight", "conv2.weight", "fc.weight"}


@pytest.mark.parametrize(
    ("round_to", "block", "expected"), [(1, (16, 1), 16), (1, (32, 32), 32), (8, (4, 6), 24), (3, (1, 1), 3)]
)
def test_block_recipe_derives_round_to_from_both_block_sides(
    round_to: int, block: tuple[int, int], expected: int
) -> None:
    recipe = tilefx.Recipe(
        channels=tilefx.ChannelPruning(round_to=round_to), blocks=tilefx.BlockPruning(block=block)
    )
    (channel_pass,) = [p for p in tilefx.default_pipeline(recipe) if isinstance(p, PruneChannelsPass)]
    assert channel_pass.round_to == expected
    alone = tilefx.default_pipeline(tilefx.Recipe(channels=tilefx.ChannelPruning(round_to=round_to)))
    assert [p.round_to for p in alone if isinstance(p, PruneChannelsPass)] == [round_to]


@pytest.fixture(scope="module")
def pruned() -> torch.fx.GraphModule:
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(4, 1), sparsity=0.5, reorder="none"))
    return tilefx.optimize(randomize_bn(ConvBN(bias=True)).eval(), (X,), recipe=recipe)


def test_compile_of_a_graph_with_nothing_to_lower_warns() -> None:
    gm = tilefx.optimize(randomize_bn(ConvBN()).eval(), (X,))
    with pytest.warns(tilefx.CoverageWarning, match="lowered nothing: no layer of the graph is block-sparse"):
        compiled = tilefx.compile(gm)
    torch.testing.assert_close(compiled(X), gm(X))


def _dense_always_faster(calls: Mapping[str, Callable[[], object]]) -> Mapping[str, float]:
    return {name: 1.0 if name == "dense" else 2.0 for name in calls}


def test_compile_that_keeps_every_layer_dense_warns_naming_them(pruned: torch.fx.GraphModule) -> None:
    with pytest.warns(tilefx.CoverageWarning) as caught:
        tilefx.compile(pruned, timer=_dense_always_faster)
    (message,) = [str(w.message) for w in caught if w.category is tilefx.CoverageWarning]
    assert message.startswith(
        "tilefx.compile: 2 of 2 block-sparse layers kept dense torch: 2 because the kernel was not "
        "faster than dense torch on its input shape (conv2d, linear)"
    )


def test_compile_that_lowers_layers_does_not_warn(pruned: torch.fx.GraphModule) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", tilefx.CoverageWarning)
        compiled = tilefx.compile(pruned, fallback="never")
    assert all(c.lowered for c in compiled.meta["lowering_choices"])
