"""Channel importance: one score per prunable unit of every channel group (higher = keep).

Criteria, each a pure function of the graph (and calibration data where stated):

- ``"l1"`` / ``"l2"``: for unit u, the sum over the group's ``"out"`` slices (producers' filters) of
  the L1 / L2 norm of the weights at ``positions[u]`` (all k positions × the rest of the tensor).
  A group with no ``"out"`` slice (e.g. channels that only reach consumers and norms) is scored
  on all its slices instead, so every prunable group gets a score.
- ``"bn_scale"``: network slimming (Liu et al., 2017): Σ |γ| over the batch-norm weights in the
  group. **Requires batch norms still in the graph**: ``FoldBatchNormPass`` removes γ, so channel
  pruning with this criterion must run before folding (scores are computed on the graph the
  pruning pass receives; nothing is recorded across passes). A prunable group without a batch
  norm raises :class:`RecipeError` (never a silent fallback): protect it or use another criterion.
- ``"taylor"``: first-order Taylor (Molchanov et al., CVPR 2019) on weights, from calibration
  batches ``(inputs, labels)`` and cross-entropy unless a loss is given. Per batch, with
  ``c[s, u] = Σ w·∂L/∂w`` over the elements of slice s at unit u:
  ``reduction="group"`` (default, the paper's group contribution) scores ``(Σ_s c[s, u])²``, the
  squared first-order loss change of removing the whole unit; ``reduction="slice"`` scores
  ``Σ_s c[s, u]²``. Scores are averaged over batches (the paper averages over mini-batches).
  Only parameters enter (buffers such as running statistics have no gradient here).
- ``"dcp"``: discrimination-aware channel selection, see :mod:`tilefx.passes.training.dcp`,
  which registers it.
- ``"vrpge"``: the channel mask VR-PGE trained (read back from the weights after
  ``MaterializeChannelMasksPass``), see :mod:`tilefx.passes.training.vrpge`, which registers it.

Criteria are looked up by name in a registry (:func:`register_criterion`): the four above are
registered here, others from their own modules, so this module imports none of them. Importing
``tilefx`` registers every built-in criterion.

Scores are float64, per group, not normalised across groups (a global ratio needs that; it is
the pruning pass's choice). Frozen groups get no score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx

from tilefx.errors import RecipeError

from ..graph_utils import BATCH_NORMS, attr_tensor
from ..infra.analysis_manager import Analysis, AnalysisManager
from ..training.calibration import Calibration, as_calibration
from .channel_groups import ChannelGroup, ChannelGroups, ParamSlice

__all__ = [
    "ChannelImportance",
    "ChannelScores",
    "CriterionOptions",
    "Reduction",
    "ScoreFunction",
    "ScoringInputs",
    "bn_scale_scores",
    "criteria",
    "magnitude_scores",
    "register_criterion",
    "score_groups",
    "taylor_scores",
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
    """Base of a criterion's own options (``DCPOptions`` is one); importance only passes them on."""


@dataclass(frozen=True)
class ScoringInputs:
    """What a criterion may read besides the graph and its groups."""

    calibration: Calibration | Iterable[Any] | None = None
    reduction: Reduction = "group"
    options: CriterionOptions | None = None


ScoreFunction = Callable[[torch.fx.GraphModule, tuple[ChannelGroup, ...], ScoringInputs], ChannelScores]
"""Scores the given prunable groups of the graph; raises RecipeError when its inputs do not fit."""

_CRITERIA: dict[str, ScoreFunction] = {}


def register_criterion(name: str) -> Callable[[ScoreFunction], ScoreFunction]:
    """Make the decorated function the channel criterion ``name`` (a later registration replaces it)."""

    def register(score: ScoreFunction) -> ScoreFunction:
        _CRITERIA[name] = score
        return score

    return register


def criteria() -> tuple[str, ...]:
    """Names of the registered channel criteria, in registration order."""
    return tuple(_CRITERIA)


def _criterion(name: str) -> ScoreFunction:
    score = _CRITERIA.get(name)
    if score is None:
        raise RecipeError(f"unknown channel criterion {name!r}; the registered ones are {criteria()}")
    return score


@dataclass(frozen=True)
class ChannelImportance(Analysis[ChannelScores]):
    """Scores every prunable group of ``am.get(groups)`` by ``criterion`` (a registered name).

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
        _criterion(self.criterion)

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> ChannelScores:
        return score_groups(
            gm, am.get(self.groups), self.criterion, self.calibration, self.reduction, self.options
        )


def score_groups(
    gm: torch.fx.GraphModule,
    groups: ChannelGroups,
    criterion: str,
    calibration: Calibration | Iterable[Any] | None = None,
    reduction: Reduction = "group",
    options: CriterionOptions | None = None,
) -> ChannelScores:
    """The scores of every prunable group in ``groups`` by the registered ``criterion``."""
    score = _criterion(criterion)
    return score(gm, groups.prunable(), ScoringInputs(calibration, reduction, options))


@register_criterion("l1")
def _l1(gm: torch.fx.GraphModule, groups: tuple[ChannelGroup, ...], inputs: ScoringInputs) -> ChannelScores:
    return ChannelScores("l1", {g.id: magnitude_scores(gm, g, 1) for g in groups})


@register_criterion("l2")
def _l2(gm: torch.fx.GraphModule, groups: tuple[ChannelGroup, ...], inputs: ScoringInputs) -> ChannelScores:
    return ChannelScores("l2", {g.id: magnitude_scores(gm, g, 2) for g in groups})


@register_criterion("bn_scale")
def _bn_scale(
    gm: torch.fx.GraphModule, groups: tuple[ChannelGroup, ...], inputs: ScoringInputs
) -> ChannelScores:
    gammas = batch_norm_weights(gm)
    return ChannelScores("bn_scale", {g.id: bn_scale_scores(gm, g, gammas) for g in groups})


@register_criterion("taylor")
def _taylor(
    gm: torch.fx.GraphModule, groups: tuple[ChannelGroup, ...], inputs: ScoringInputs
) -> ChannelScores:
    data = as_calibration(inputs.calibration, 'criterion "taylor"')
    return ChannelScores("taylor", taylor_scores(gm, groups, data, inputs.reduction))


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


def taylor_scores(
    gm: torch.fx.GraphModule,
    groups: Iterable[ChannelGroup],
    calibration: Calibration,
    reduction: Reduction = "group",
) -> dict[int, torch.Tensor]:
    """First-order Taylor scores, averaged over the calibration batches (see the module docstring)."""
    groups = tuple(groups)
    parameters = dict(gm.named_parameters(remove_duplicate=False))
    targets = sorted({s.target for g in groups for s in g.slices if s.target in parameters})
    totals = {g.id: torch.zeros(g.units, dtype=torch.float64) for g in groups}
    batches = 0
    for inputs, labels in calibration:
        weights = {t: parameters[t].detach().requires_grad_() for t in targets}
        output = torch.func.functional_call(gm, weights, inputs, strict=False)
        loss = calibration.loss_of(output, labels)
        grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
        products = {
            t: (w.detach() * g).double()
            for (t, w), g in zip(weights.items(), grads, strict=True)
            if g is not None
        }
        for group in groups:
            totals[group.id] += _taylor_batch(group, products, reduction)
        batches += 1
    if batches == 0:
        raise RecipeError('criterion "taylor": the calibration data yielded no batches')
    return {gid: total / batches for gid, total in totals.items()}


def _taylor_batch(
    group: ChannelGroup, products: Mapping[str, torch.Tensor], reduction: Reduction
) -> torch.Tensor:
    contributions = [
        unit_rows(products[s.target], s).sum(dim=1) for s in group.slices if s.target in products
    ]
    if not contributions:
        return torch.zeros(group.units, dtype=torch.float64)
    stacked = torch.stack(contributions)  # [slices, units]
    if reduction == "group":
        return stacked.sum(dim=0).square()
    return stacked.square().sum(dim=0)
