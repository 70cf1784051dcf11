"""The default pipeline: an ordered list of passes, built from a recipe in one function.

To insert your own pass, take this list, edit it, and hand it to ``optimize(..., passes=...)``.
"""

from __future__ import annotations

from typing import Any

from tilefx.passes.analysis.tetris import BEST, FAITHFUL, FAST
from tilefx.passes.analysis.tetris_planner import TetrisPlanner
from tilefx.passes.cleanup import EliminateDeadCodePass
from tilefx.passes.fold_batchnorm import FoldBatchNormPass
from tilefx.passes.infra.errors import RecipeError
from tilefx.passes.infra.pass_base import PassBase
from tilefx.passes.prune_blocks import PruneBlocksPass
from tilefx.passes.prune_channels import PruneChannelsPass
from tilefx.passes.prune_connections import PruneConnectionsPass
from tilefx.passes.reorder_dims import ReorderDimsPass

from .recipe import BlockPruning, ChannelPruning, Recipe

__all__ = ["default_pipeline"]


def default_pipeline(recipe: Recipe, calibration: Any = None) -> list[PassBase]:
    """Passes in the order the methods compose (seeds.md): fold, shrink channels, sparsify, clean up."""
    passes: list[PassBase] = []
    if recipe.fold_batchnorm:
        passes.append(FoldBatchNormPass())
    passes.append(EliminateDeadCodePass())
    if recipe.channels is not None:
        passes += [_channel_pass(recipe.channels, recipe.skip, calibration), EliminateDeadCodePass()]
    if recipe.connections is not None:
        options = recipe.connections
        passes.append(PruneConnectionsPass(sparsity=options.sparsity, criterion=options.criterion))
    if recipe.blocks is not None:
        passes += _block_passes(recipe.blocks, recipe.skip)
    return passes


def _channel_pass(options: ChannelPruning, skip: tuple[str, ...], calibration: Any) -> PassBase:
    if options.criterion not in ("l1", "l2"):
        raise RecipeError(
            f"ChannelPruning.criterion={options.criterion!r} is not available in this build yet"
        )
    return PruneChannelsPass(
        ratio=options.ratio,
        criterion=options.criterion,
        scope=options.scope,
        protect=options.protect,
        round_to=options.round_to,
        skip=skip,
        attention=options.attention,
    )


def _block_passes(options: BlockPruning, skip: tuple[str, ...]) -> list[PassBase]:
    """TETRIS picks group orders for the block pruning to come; they are folded, then blocks pruned."""
    passes: list[PassBase] = []
    if options.reorder == "tetris":
        preset = {"faithful": FAITHFUL, "fast": FAST, "best": BEST}[options.tetris]
        passes.append(
            ReorderDimsPass(planner=TetrisPlanner(options.block, options.sparsity, preset), skip=skip)
        )
    return [*passes, PruneBlocksPass(block=options.block, sparsity=options.sparsity)]
