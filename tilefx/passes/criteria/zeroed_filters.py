"""The criterion "zeroed_filters": a unit whose filters (and biases) are all zero is removed.

For weights some other method already zeroed whole output channels of — self-supervised GAN
compression with ``granularity="filter"`` (``tilefx.gan``), a filter mask trained elsewhere: each
group keeps its live units (``ChannelScores.keep``, at least one), so channel pruning removes
exactly the dead ones; scores are the L1 norms over the "out" slices, so a zeroed filter scores
exactly zero. Not a choice of ``ChannelPruning`` (it decides nothing by itself).
"""

from __future__ import annotations

import torch.fx

from ..analysis.channel_groups import ChannelGroup
from .base import ChannelScores, Criterion, ScoringInputs, magnitude_scores

__all__ = ["ZEROED_FILTERS"]


def _zeroed_filters(
    gm: torch.fx.GraphModule, groups: tuple[ChannelGroup, ...], inputs: ScoringInputs
) -> ChannelScores:
    scores, keep = {}, {}
    for group in groups:
        score = magnitude_scores(gm, group, 1)
        scores[group.id], keep[group.id] = score, max(int((score > 0).sum()), 1)
    return ChannelScores("zeroed_filters", scores, keep)


ZEROED_FILTERS = Criterion("zeroed_filters", _zeroed_filters, public=False)
