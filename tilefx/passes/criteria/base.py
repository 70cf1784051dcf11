"""What every channel criterion shares: its record in the catalogue, its inputs and its output.

A criterion scores every prunable unit of the channel groups it is given (higher = keep). It is a
:class:`Criterion` record — name, score function, the type of its own options, and what the
pipeline must arrange for it (calibration batches, batch norms still in the graph, structure
training before it) — listed in the catalogue of :mod:`tilefx.passes.criteria`, which the recipe,
``tilefx.optimize`` and the default pipeline all read: a criterion's name and needs are written
once, beside its code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx

from ..analysis.channel_groups import ChannelGroup, ParamSlice
from ..graph_utils import attr_tensor
from ..training.calibration import Calibration

__all__ = [
    "ChannelScores",
    "Criterion",
    "CriterionOptions",
    "Reduction",
    "ScoreFunction",
    "ScoringInputs",
    "magnitude_scores",
    "unit_rows",
]

Reduction = Literal["group", "slice"]


@dataclass(frozen=True, eq=False)
class ChannelScores:
    """Per-unit scores keyed by group id (float64, length ``group.units``; higher = more important).

    ``keep``: for groups where the criterion itself decided how many units stay (DCP-Adapt's
    ε stopping), that count; the pruning pass uses it there instead of its ratio.
    """

    criterion: str
    scores: Mapping[int, torch.Tensor]
    keep: Mapping[int, int] = field(default_factory=dict)

    def of(self, group: ChannelGroup) -> torch.Tensor:
        return self.scores[group.id]


class CriterionOptions:
    """Base of a criterion's own options (``DCPOptions`` is one); the importance analysis only passes them on."""


@dataclass(frozen=True)
class ScoringInputs:
    """What a criterion may read besides the graph and its groups."""

    calibration: Calibration | Iterable[Any] | None = None
    reduction: Reduction = "group"
    options: CriterionOptions | None = None


ScoreFunction = Callable[[torch.fx.GraphModule, tuple[ChannelGroup, ...], ScoringInputs], ChannelScores]
"""Scores the given prunable groups of the graph; raises RecipeError when its inputs do not fit."""


@dataclass(frozen=True)
class Criterion:
    """One channel criterion, as the recipe and the pipeline see it.

    options_type: the type of ``ChannelPruning.options`` it reads (None: it takes none).
    needs_calibration: it reads labelled calibration batches (``optimize(..., calibration=...)``).
    reads_batch_norms: it reads batch-norm weights, so it runs before ``FoldBatchNormPass``.
    trains_structure: it reads a mask that ``TrainStructureParamsPass`` trains and
    ``MaterializeChannelMasksPass`` folds into the weights, so the pipeline runs those first.
    public: a choice of ``ChannelPruning.criterion`` (others serve tilefx's own entry points).
    """

    name: str
    score: ScoreFunction
    options_type: type[CriterionOptions] | None = None
    needs_calibration: bool = False
    reads_batch_norms: bool = False
    trains_structure: bool = False
    public: bool = True


def unit_rows(tensor: torch.Tensor, piece: ParamSlice) -> torch.Tensor:
    """``tensor``'s entries of each unit as rows: ``[units, k · (everything but dim)]``."""
    moved = tensor.movedim(piece.dim, 0)
    positions = torch.as_tensor(piece.positions, dtype=torch.long, device=tensor.device)
    return moved[positions].reshape(positions.shape[0], -1)


def magnitude_scores(gm: torch.fx.GraphModule, group: ChannelGroup, p: int) -> torch.Tensor:
    """Σ over the "out" slices (all slices if none) of each unit's L``p`` norm."""
    pieces = group.slices_by_role("out") or group.slices
    score = torch.zeros(group.units, dtype=torch.float64)
    for piece in pieces:
        rows = unit_rows(attr_tensor(gm, piece.target).detach().double(), piece)
        score += rows.norm(p=p, dim=1)
    return score
