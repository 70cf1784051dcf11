"""The default pipeline: an ordered list of passes, built from a recipe in one function.

To insert your own pass, take this list, edit it, and hand it to ``optimize(..., passes=...)``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from tilefx.passes.analysis.channel_groups import ChannelGroupsAnalysis
from tilefx.passes.analysis.importance import ChannelImportance
from tilefx.passes.analysis.tetris import PRESETS
from tilefx.passes.analysis.tetris_planner import TetrisPlanner
from tilefx.passes.cleanup import EliminateDeadCodePass
from tilefx.passes.criteria import criterion
from tilefx.passes.criteria.dcp import DCPOptions
from tilefx.passes.criteria.vrpge import VRPGEOptions
from tilefx.passes.fold_batchnorm import FoldBatchNormPass
from tilefx.passes.infra.pass_base import PassBase
from tilefx.passes.materialize_masks import MaterializeChannelMasksPass
from tilefx.passes.prune_blocks import PruneBlocksPass
from tilefx.passes.prune_channels import PruneChannelsPass
from tilefx.passes.prune_connections import PruneConnectionsPass
from tilefx.passes.quantize_linears import QuantizeLinearsPass
from tilefx.passes.recover_sparsity import RecoverSparsityPass
from tilefx.passes.refit_consumers import RefitConsumersPass
from tilefx.passes.reorder_dims import ReorderDimsPass
from tilefx.passes.train_dsm_prior import TrainDSMPriorPass
from tilefx.passes.train_structure_params import TrainStructureParamsPass
from tilefx.passes.training.calibration import as_calibration

from .recipe import BlockPruning, ChannelPruning, DirichletScaleMixture, Recipe, Recovery

__all__ = ["default_pipeline"]


def default_pipeline(recipe: Recipe, calibration: Any = None) -> list[PassBase]:
    """Passes in the order the methods compose (docs/methods.md): fold, shrink channels, sparsify, clean up.

    Criteria that read the batch norms' γ run before folding removes them: channel pruning by
    ``bn_scale`` and connection pruning by Synaptic Strength (|γ_in| · ‖kernel‖). Every other
    criterion scores the folded graph, the one it prunes. ``ChannelPruning(refit=N)`` refits the
    layers that lost input channels right after the channels go. With ``recipe.recovery`` the
    block (or connection) pruning pass becomes a :class:`RecoverSparsityPass`, which prunes while
    training (or, with neither, only trains the channel-pruned model back toward the dense one);
    TETRIS orders are still chosen once, on the dense weights, and folded before it.
    ``recipe.prior`` (the DSM prior) trains and prunes its layers after any channel pruning.
    ``recipe.quantize`` runs last, on the final (pruned, recovered) weights.
    """
    passes = _pruning_pipeline(recipe, calibration)
    if recipe.quantize is not None:
        passes.append(_quantize_pass(recipe, calibration))
    return passes


def _pruning_pipeline(recipe: Recipe, calibration: Any) -> list[PassBase]:
    channels, connections, recovery = recipe.channels, recipe.connections, recipe.recovery
    channels_first = channels is not None and criterion(channels.criterion).reads_batch_norms
    connections_first = connections is not None and connections.criterion == "synaptic_strength"
    passes: list[PassBase] = []
    if channels is not None and recipe.blocks is not None:
        channels = replace(channels, round_to=block_round_to(channels.round_to, recipe.blocks.block))
    if channels is not None and channels_first:
        passes += _channel_passes(channels, recipe.skip, calibration)
    if connections is not None and connections_first:
        passes.append(PruneConnectionsPass(sparsity=connections.sparsity, criterion=connections.criterion))
    if recipe.fold_batchnorm:
        passes.append(FoldBatchNormPass())
    passes.append(EliminateDeadCodePass())
    if channels is not None and not channels_first:
        passes += [*_structure_passes(channels, recipe.skip, calibration)]
        passes += _channel_passes(channels, recipe.skip, calibration)
    if recipe.prior is not None:
        passes.append(_prior_pass(recipe.prior, calibration))
    if recovery is not None:
        return passes + _recovery_passes(recipe, recovery, calibration)
    if connections is not None and not connections_first:
        passes.append(PruneConnectionsPass(sparsity=connections.sparsity, criterion=connections.criterion))
    if recipe.blocks is not None:
        passes += _block_passes(recipe.blocks, recipe.skip)
    return passes


def block_round_to(round_to: int, block: tuple[int, int]) -> int:
    """The channel multiple that keeps pruned layers tileable by ``block`` (rows, cols).

    A channel count is the rows of the layer that makes it and the columns of the one that reads
    it, so it must be a multiple of both block sides: without this, channel pruning at 30% kept
    ResNet-50 widths like 45 and 359, no 16-row block divided any layer, and block pruning left
    every layer dense. Rounding (up: a group keeps at least what the ratio asks) is chosen over
    pruning ragged edge blocks because ``BlockSparsity`` and the kernels' packing tile each
    weight exactly; it costs at most ``lcm - 1`` pruned channels per group.
    """
    return math.lcm(round_to, *block)


def _channel_passes(options: ChannelPruning, skip: tuple[str, ...], calibration: Any) -> list[PassBase]:
    """Prune the channels, clean up, and (``refit``) refit the layers that lost inputs."""
    passes = [_channel_pass(options, skip, calibration), EliminateDeadCodePass()]
    if options.refit:
        data = as_calibration(calibration, "ChannelPruning(refit=...)")
        passes.append(RefitConsumersPass(data, batches=options.refit))
    return passes


def _channel_pass(options: ChannelPruning, skip: tuple[str, ...], calibration: Any) -> PassBase:
    """Criteria that need data or options of their own score through a ChannelImportance analysis;
    the others (l1, l2, bn_scale) are scored inside the pass."""
    entry = criterion(options.criterion)
    if not (entry.needs_calibration or entry.options_type):
        return PruneChannelsPass(**_channel_fields(options), criterion=options.criterion, skip=skip)
    data = as_calibration(calibration, f'ChannelPruning(criterion="{options.criterion}")')
    given = options.options or (entry.options_type() if entry.options_type else None)
    if isinstance(given, DCPOptions):
        given = replace(given, rate=options.ratio)  # DCP's own η is the recipe's ratio
    scores = ChannelImportance(
        ChannelGroupsAnalysis(skip, options.protect, options.attention),  # the pass's groups
        options.criterion,
        calibration=data,
        options=given,
    )
    return PruneChannelsPass(**_channel_fields(options), skip=skip, scores=scores)


def _channel_fields(options: ChannelPruning) -> dict[str, Any]:
    """The options ``PruneChannelsPass`` shares with ``ChannelPruning``."""
    return {
        "ratio": options.ratio,
        "scope": options.scope,
        "protect": options.protect,
        "round_to": options.round_to,
        "attention": options.attention,
    }


def _structure_passes(options: ChannelPruning, skip: tuple[str, ...], calibration: Any) -> list[PassBase]:
    """VR-PGE trains a channel mask into wrappers, which are folded before the channels go."""
    if not criterion(options.criterion).trains_structure:
        return []
    data = as_calibration(calibration, f'ChannelPruning(criterion="{options.criterion}")')
    search = options.options if isinstance(options.options, VRPGEOptions) else VRPGEOptions()
    train = TrainStructureParamsPass(options.ratio, data, search, skip, options.protect, options.attention)
    return [train, MaterializeChannelMasksPass()]


def _block_passes(options: BlockPruning, skip: tuple[str, ...]) -> list[PassBase]:
    """TETRIS picks group orders for the block pruning to come; they are folded, then blocks pruned."""
    passes: list[PassBase] = []
    if options.reorder == "tetris":
        planner = TetrisPlanner(options.block, options.sparsity, PRESETS[options.tetris])
        passes.append(ReorderDimsPass(planner=planner, skip=skip))
    return [*passes, PruneBlocksPass(block=options.block, sparsity=options.sparsity)]


def _prior_pass(prior: DirichletScaleMixture, calibration: Any) -> PassBase:
    """The DSM prior trains on the folded graph, after any channel pruning, then prunes by |w|."""
    return TrainDSMPriorPass(prior, as_calibration(calibration, "Recipe.prior"))


def _quantize_pass(recipe: Recipe, calibration: Any) -> PassBase:
    """Quantization needs data only for static activation grids and the accuracy-aware fallback."""
    options = recipe.quantize
    assert options is not None
    data = as_calibration(calibration, options.label) if options.needs_calibration else None
    return QuantizeLinearsPass(options, data)


def _recovery_passes(recipe: Recipe, recovery: Recovery, calibration: Any) -> list[PassBase]:
    """Reorder (TETRIS, on the dense weights), then prune while training; with no blocks or
    connections to prune, train only (the channel-pruned model back toward the dense one)."""
    data = as_calibration(calibration, "Recipe.recovery")
    passes: list[PassBase] = []
    block, sparsity = None, 0.0
    if recipe.blocks is not None:
        passes += _block_passes(recipe.blocks, recipe.skip)[:-1]  # all but the one-shot pruning
        block, sparsity = recipe.blocks.block, recipe.blocks.sparsity
    elif recipe.connections is not None:
        block, sparsity = (1, 1), recipe.connections.sparsity  # a connection is a (1, 1) channel block
    passes.append(RecoverSparsityPass(recovery, data, block=block, sparsity=sparsity))
    return passes
