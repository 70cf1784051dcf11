"""The criterion "bn_scale": network slimming (Liu et al., 2017), Σ |γ| over a group's batch norms.

**Requires batch norms still in the graph**: ``FoldBatchNormPass`` removes γ, so the pipeline
runs channel pruning by this criterion before folding (``Criterion.reads_batch_norms``). A
prunable group without a batch norm raises :class:`RecipeError` (never a silent fallback):
protect it or use another criterion.
"""

from __future__ import annotations

import torch
import torch.fx

from tilefx.errors import RecipeError

from ..analysis.channel_groups import ChannelGroup
from ..graph_utils import BATCH_NORMS, attr_tensor
from .base import ChannelScores, Criterion, ScoringInputs, unit_rows

__all__ = ["BN_SCALE", "batch_norm_weights", "bn_scale_scores"]


def batch_norm_weights(gm: torch.fx.GraphModule) -> frozenset[str]:
    """Targets of every batch norm's γ in the graph."""
    found = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in BATCH_NORMS:
            continue
        weight = node.args[1] if len(node.args) > 1 else None
        if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
            found.add(str(weight.target))
    return frozenset(found)


def bn_scale_scores(gm: torch.fx.GraphModule, group: ChannelGroup, gammas: frozenset[str]) -> torch.Tensor:
    """Σ |γ| over the group's batch-norm weight slices."""
    pieces = [s for s in group.slices if s.target in gammas]
    if not pieces:
        raise RecipeError(
            f'criterion "bn_scale": channel group {group.id} (nodes {", ".join(group.nodes[:3])}) has no '
            "batch norm; run channel pruning before FoldBatchNormPass, protect these layers, "
            'or use criterion "l1"'
        )
    score = torch.zeros(group.units, dtype=torch.float64)
    for piece in pieces:
        score += unit_rows(attr_tensor(gm, piece.target).detach().double(), piece).abs().sum(dim=1)
    return score


def _bn_scale(
    gm: torch.fx.GraphModule, groups: tuple[ChannelGroup, ...], inputs: ScoringInputs
) -> ChannelScores:
    gammas = batch_norm_weights(gm)
    return ChannelScores("bn_scale", {g.id: bn_scale_scores(gm, g, gammas) for g in groups})


BN_SCALE = Criterion("bn_scale", _bn_scale, reads_batch_norms=True)
