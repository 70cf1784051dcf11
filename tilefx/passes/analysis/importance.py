"""Channel importance: the analysis that scores every prunable unit of every channel group.

:class:`ChannelImportance` asks the criterion named in it (looked up in the catalogue of
:mod:`tilefx.passes.criteria`, where each criterion lives in its own module) to score the
prunable groups of a :class:`ChannelGroupsAnalysis`, and caches the result like any analysis.
Scores are float64, per group, not normalised across groups (a global ratio needs that; it is
the pruning pass's choice). Frozen groups get no score.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch.fx

from ..criteria import ChannelScores, CriterionOptions, ScoringInputs, criterion
from ..criteria.base import Reduction
from ..infra.analysis_manager import Analysis, AnalysisManager
from ..training.calibration import Calibration
from .channel_groups import ChannelGroups

__all__ = ["ChannelImportance", "score_groups"]


@dataclass(frozen=True)
class ChannelImportance(Analysis[ChannelScores]):
    """Scores every prunable group of ``am.get(groups)`` by ``criterion`` (a catalogued name).

    ``calibration`` (taylor, dcp) is compared by identity, so the cache never mixes data sets.
    ``options`` holds the criterion's own options (``DCPOptions`` for "dcp").
    Requires: for "bn_scale", batch norms not yet folded.
    """

    groups: Analysis[ChannelGroups]
    criterion: str = "l1"
    calibration: Calibration | None = None
    reduction: Reduction = "group"
    options: CriterionOptions | None = None

    def __post_init__(self) -> None:
        criterion(self.criterion)

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> ChannelScores:
        return score_groups(
            gm, am.get(self.groups), self.criterion, self.calibration, self.reduction, self.options
        )


def score_groups(
    gm: torch.fx.GraphModule,
    groups: ChannelGroups,
    name: str,
    calibration: Calibration | Iterable[Any] | None = None,
    reduction: Reduction = "group",
    options: CriterionOptions | None = None,
) -> ChannelScores:
    """The scores of every prunable group in ``groups`` by the catalogued criterion ``name``."""
    score = criterion(name).score
    return score(gm, groups.prunable(), ScoringInputs(calibration, reduction, options))
