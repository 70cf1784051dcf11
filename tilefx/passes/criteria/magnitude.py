"""The criteria "l1" and "l2": the norm of each unit's filters in its producers.

For unit u, the sum over the group's ``"out"`` slices (producers' filters) of the L1 / L2 norm
of the weights at ``positions[u]`` (all k positions × the rest of the tensor). A group with no
``"out"`` slice (channels that only reach consumers and norms) is scored on all its slices, so
every prunable group gets a score. Needs nothing but the weights.
"""

from __future__ import annotations

import torch.fx

from ..analysis.channel_groups import ChannelGroup
from .base import ChannelScores, Criterion, ScoringInputs, magnitude_scores

__all__ = ["L1", "L2"]


def _l1(gm: torch.fx.GraphModule, groups: tuple[ChannelGroup, ...], inputs: ScoringInputs) -> ChannelScores:
    return ChannelScores("l1", {g.id: magnitude_scores(gm, g, 1) for g in groups})


def _l2(gm: torch.fx.GraphModule, groups: tuple[ChannelGroup, ...], inputs: ScoringInputs) -> ChannelScores:
    return ChannelScores("l2", {g.id: magnitude_scores(gm, g, 2) for g in groups})


L1 = Criterion("l1", _l1)
L2 = Criterion("l2", _l2)
