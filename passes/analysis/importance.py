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
- ``"dcp"``: discrimination-aware channel selection, see :mod:`tilefx.passes.training.dcp`.

Scores are float64, per group, not normalised across groups (a global ratio needs that; it is
the pruning pass's choice). Frozen groups get no score.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx

from ..graph_utils import attr_tensor
from ..infra.analysis_manager import Analysis, AnalysisManager
from ..infra.errors import RecipeError
from ..training.calibration import Calibration, as_calibration
from .channel_groups import ChannelGroup, ChannelGroups, ParamSlice

__all__ = [
    "BATCH_NORMS",
    "ChannelImportance",
    "ChannelScores",
    "Criterion",
    "bn_scale_scores",
    "magnitude_scores",
    "score_groups",
    "taylor_scores",
    "unit_rows",
]

Criterion = Literal["l1", "l2", "bn_scale", "taylor", "dcp"]
CRITERIA: tuple[str, ...] = ("l1", "l2", "bn_scale", "taylor", "dcp")

aten = torch.ops.aten
BATCH_NORMS = frozenset(
    {
        aten.batch_norm.default,
        aten._native_batch_norm_legit_no_training.default,
        aten._native_batch_norm_legit.default,
        aten.native_batch_norm.default,
    }
)


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


@dataclass(frozen=True)
class ChannelImportance(Analysis[ChannelScores]):
    """Scores every prunable group of ``am.get(groups)`` by ``criterion``.

    ``calibration`` (taylor, dcp) is compared by identity, so the cache never mixes data sets.
    ``options`` holds the DCP options (:class:`tilefx.passes.training.dcp.DCPOptions`) for "dcp".
    Requires: for "bn_scale", batch norms not yet folded.
    """

    groups: Analysis[ChannelGroups]
    criterion: Criterion = "l1"
    calibration: Calibration | None = None
    reduction: Literal["group", "slice"] = "group"
    options: Any = field(default=None)

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise RecipeError(
                f"ChannelImportance.criterion must be one of {CRITERIA}, got {self.criterion!r}"
            )

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> ChannelScores:
        return score_groups(
            gm, am.get(self.groups), self.criterion, self.calibration, self.reduction, self.options
        )


def score_groups(
    gm: torch.fx.GraphModule,
    groups: ChannelGroups,
    criterion: Criterion,
    calibration: Calibration | Iterable[Any] | None = None,
    reduction: Literal["group", "slice"] = "group",
    options: Any = None,
) -> ChannelScores:
    """The scores of every prunable group in ``groups`` (see the module docstring)."""
    prunable = groups.prunable()
    if criterion in ("l1", "l2"):
        p = 1 if criterion == "l1" else 2
        return ChannelScores(criterion, {g.id: magnitude_scores(gm, g, p) for g in prunable})
    if criterion == "bn_scale":
        gammas = batch_norm_weights(gm)
        return ChannelScores(criterion, {g.id: bn_scale_scores(gm, g, gammas) for g in prunable})
    if criterion == "taylor":
        data = as_calibration(calibration, 'criterion "taylor"')
        return ChannelScores(criterion, taylor_scores(gm, prunable, data, reduction))
    if criterion == "dcp":
        from ..training.dcp import DCPOptions, dcp_scores

        data = as_calibration(calibration, 'criterion "dcp"')
        options = options if options is not None else DCPOptions()
        result = dcp_scores(gm, prunable, data, options)
        keep = {}
        if options.epsilon is not None:  # DCP-Adapt: the units it selected (score ≥ 1) stay
            keep = {
                gid: int((s >= 1).sum()) for gid, s in result.scores.items() if gid not in result.fallback
            }
        return ChannelScores(criterion, result.scores, keep)
    raise RecipeError(f"unknown channel criterion {criterion!r}; choose one of {CRITERIA}")


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
    reduction: Literal["group", "slice"] = "group",
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
    group: ChannelGroup, products: Mapping[str, torch.Tensor], reduction: Literal["group", "slice"]
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
