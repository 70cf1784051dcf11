"""Physically remove channels: every coupled group shrinks consistently, the model gets smaller."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.fx

from tilefx.errors import RecipeError
from tilefx.options import option, options

from .analysis.channel_groups import ChannelGroups, ChannelGroupsAnalysis, ChannelTrace
from .analysis.importance import score_groups
from .criteria import ChannelScores, criterion
from .graph_utils import attr_tensor, set_attr_tensor, unique_attr_name
from .handlers.api import Attention, Channels
from .infra.analysis_manager import Analysis, AnalysisManager
from .infra.pass_base import Numerics, PassBase, PassResult
from .infra.preconditions import require_aten_graph
from .metadata import ChannelSelection, Metadata, get_metadata, set_metadata

log = logging.getLogger(__name__)

__all__ = ["PruneChannelsPass", "Scope"]

#: Which units compete: those of each group ("layer") or all groups' together ("global").
Scope = Literal["layer", "global"]

aten = torch.ops.aten


@options
class PruneChannelsPass(PassBase):
    """Remove the lowest-scoring ``ratio`` of the units of every prunable channel group.

    Slices producers' filters, consumers' input channels, norm parameters, biases and additive
    parameters, and shrinks size arguments (views, splits, conv ``groups``). A group never loses
    all its units. ``scope="global"`` ranks units of all groups together (scores normalised by
    each group's mean). ``round_to`` keeps each group's unit count a multiple of it.
    ``attention="heads"`` removes whole attention heads instead of the same head dims in every head.
    ``scores`` may supply precomputed per-group scores (group id → tensor of ``units``) or an
    analysis returning them (``ChannelImportance``: Taylor, DCP), asked of this pass's analysis
    manager on the graph it receives; otherwise the catalogued ``criterion`` (one that needs no
    calibration data: "l1", "l2", "bn_scale") scores them. Where
    the scores say how many units a group keeps (``ChannelScores.keep``: DCP-Adapt), that count
    replaces ``ratio`` for the group.

    Verified as "masked": the result equals the input model with the removed channels zeroed
    wherever they appear (after every op that carries them).
    Requires: an ATen-level graph (checked: :class:`PreconditionError`).
    """

    ratio: float = option(default=0.3, ge=0, lt=1)
    criterion: str = "l1"
    scope: Scope = "layer"
    protect: tuple[str, ...] = ()
    round_to: int = option(default=1, ge=1)
    skip: tuple[str, ...] = ()
    attention: Attention = "head_dims"
    scores: Any = field(default=None, compare=False, hash=False)

    numerics: ClassVar[Numerics] = "masked"

    def check(self) -> None:
        if self.scores is None and criterion(self.criterion).needs_calibration:
            raise RecipeError(
                f"PruneChannelsPass: criterion {self.criterion!r} needs calibration data; pass "
                "scores=ChannelImportance(groups, criterion, calibration=...) (tilefx.optimize does)"
            )

    def requires(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> None:
        require_aten_graph(self.name, gm)

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        groups = am.get(ChannelGroupsAnalysis(self.skip, self.protect, self.attention))
        _log_frozen(groups)
        scores = self._scores(gm, am, groups)
        removed = _select(groups, scores, self.ratio, self.scope, self.round_to)
        if removed.size == 0:
            return PassResult(gm, modified=False)
        records = _apply(gm, groups.trace, removed)
        metadata = get_metadata(gm)
        for target, selection in records:
            metadata = metadata.with_annotation(target, selection)
        set_metadata(gm, metadata)
        return PassResult(gm, modified=True)

    def _scores(self, gm: torch.fx.GraphModule, am: AnalysisManager, groups: ChannelGroups) -> ChannelScores:
        if self.scores is None:
            return score_groups(gm, groups, self.criterion)
        if isinstance(self.scores, Analysis):
            return am.get(self.scores)
        if isinstance(self.scores, ChannelScores):
            return self.scores
        return ChannelScores("given", dict(self.scores))

    def masked_reference(
        self, before: torch.fx.GraphModule, after: torch.fx.GraphModule, example_inputs: Sequence[Any]
    ) -> torch.fx.GraphModule:
        """``before`` with every removed channel zeroed after each node that carries it."""
        analysis = ChannelGroupsAnalysis(self.skip, self.protect, self.attention).run(
            before, AnalysisManager(before, example_inputs)
        )
        removed = _removed_roots(analysis.trace, get_metadata(before), get_metadata(after))
        return _mask_activations(before, analysis.trace, removed)


def _select(
    groups: ChannelGroups, scores: ChannelScores, ratio: float, scope: str, round_to: int
) -> np.ndarray:
    candidates = [g for g in groups.prunable() if g.units > 1]
    decided = [g for g in candidates if g.id in scores.keep]  # the criterion chose their size
    removed = [_lowest(groups, scores, g, g.units - _rounded_keep(g.units, scores.keep[g.id], round_to))
               for g in decided]  # fmt: skip
    rest = [g for g in candidates if g.id not in scores.keep]
    if scope == "global":
        removed.append(_select_global(groups, rest, scores.scores, ratio, round_to))
    else:
        for group in rest:
            keep = _rounded_keep(group.units, group.units - math.floor(group.units * ratio), round_to)
            removed.append(_lowest(groups, scores, group, group.units - keep))
    return np.concatenate(removed) if removed else np.zeros(0, dtype=np.int64)


def _lowest(groups: ChannelGroups, scores: ChannelScores, group: Any, count: int) -> np.ndarray:
    """The roots of ``group``'s ``count`` lowest-scoring units."""
    order = torch.argsort(_score_of(scores.scores, group.id, group.units), stable=True)[:count]
    return groups.roots[group.id][order.numpy()]


def _select_global(
    groups: ChannelGroups,
    candidates: list[Any],
    scores: Mapping[int, torch.Tensor],
    ratio: float,
    round_to: int,
) -> np.ndarray:
    entries = []
    for group in candidates:
        score = _score_of(scores, group.id, group.units).double()
        normalised = score / score.mean().clamp_min(1e-12)
        entries += [(float(v), group.id, u) for u, v in enumerate(normalised.tolist())]
    budget = math.floor(sum(g.units for g in candidates) * ratio)
    left = {g.id: g.units for g in candidates}
    chosen: dict[int, list[int]] = {g.id: [] for g in candidates}
    for _, gid, unit in sorted(entries):
        if budget == 0:
            break
        if left[gid] > 1:
            chosen[gid].append(unit)
            left[gid] -= 1
            budget -= 1
    removed = []
    for group in candidates:
        keep = _rounded_keep(group.units, group.units - len(chosen[group.id]), round_to)
        units = chosen[group.id][: group.units - keep]  # lowest first, as chosen
        removed.append(groups.roots[group.id][np.array(units, dtype=np.int64)])
    return np.concatenate(removed) if removed else np.zeros(0, dtype=np.int64)


def _log_frozen(groups: ChannelGroups) -> None:
    """Say which channels stay and why: a frozen group is the usual answer to "why so little"."""
    frozen = [g for g in groups.groups if g.frozen and g.slices]
    if not frozen:
        return
    reasons: dict[str, int] = {}
    for group in frozen:
        reasons[group.reason or "unknown"] = reasons.get(group.reason or "unknown", 0) + group.units
    listed = "; ".join(
        f"{units} units: {reason}" for reason, units in sorted(reasons.items(), key=lambda r: -r[1])[:5]
    )
    log.info("%d of %d channel groups are frozen (never pruned): %s", len(frozen), len(groups.groups), listed)


def _rounded_keep(units: int, keep: int, round_to: int) -> int:
    return min(units, max(round_to, math.ceil(max(keep, 1) / round_to) * round_to))


def _score_of(scores: Mapping[int, torch.Tensor], gid: int, units: int) -> torch.Tensor:
    score = torch.as_tensor(scores[gid]).flatten()
    if score.numel() != units or not bool(torch.isfinite(score).all()):
        raise RecipeError(
            f"channel scores for group {gid} must be {units} finite numbers, got shape {tuple(score.shape)}"
        )
    return score


def _apply(
    gm: torch.fx.GraphModule, trace: ChannelTrace, removed: np.ndarray
) -> list[tuple[str, ChannelSelection]]:
    kept = trace.kept_lookup(removed)
    masks: dict[tuple[str, int], np.ndarray] = {}
    for use in trace.uses:
        masks.setdefault((use.target, use.dim), kept(use.ids))
    records = []
    metadata = get_metadata(gm)
    for (target, dim), mask in masks.items():
        if mask.all():
            continue
        index = np.nonzero(mask)[0]
        tensor = attr_tensor(gm, target)
        set_attr_tensor(gm, target, tensor.detach().index_select(dim, torch.from_numpy(index)).clone())
        metadata = metadata.reindexed(target, dim, torch.from_numpy(index), tensor.shape)  # earlier sparsity
        records.append((target, ChannelSelection(dim, tuple(index.tolist()), len(mask))))
    set_metadata(gm, metadata)
    for hook in trace.hooks:
        hook(kept)
    gm.recompile()
    return records


def _removed_roots(trace: ChannelTrace, before: Metadata, after: Metadata) -> np.ndarray:
    """Recover which units a run removed from the ChannelSelection records it added."""
    removed: list[np.ndarray] = []
    for use in trace.uses:
        old = before.of(use.target, ChannelSelection)
        for selection in after.of(use.target, ChannelSelection):
            if selection in old or selection.dim != use.dim:
                continue
            dropped = np.setdiff1d(np.arange(selection.original), np.array(selection.kept, dtype=np.int64))
            removed.append(trace.uf.find(use.ids[dropped]))
    return np.unique(np.concatenate(removed)) if removed else np.zeros(0, dtype=np.int64)


def _mask_activations(
    gm: torch.fx.GraphModule, trace: ChannelTrace, removed: np.ndarray
) -> torch.fx.GraphModule:
    kept = trace.kept_lookup(removed)
    for node in list(gm.graph.nodes):
        value, val = trace.values.get(node.name), node.meta.get("val")
        if (
            not isinstance(value, Channels)
            or not isinstance(val, torch.Tensor)
            or not val.is_floating_point()
        ):
            continue
        mask = kept(value.ids)
        if mask.all():
            continue
        shape = [1] * val.dim()
        shape[value.dim] = -1
        name = unique_attr_name(gm, "_tilefx_channel_mask")
        gm.register_buffer(name, torch.from_numpy(mask).to(val.dtype).reshape(shape))
        with gm.graph.inserting_after(node):
            mask_node = gm.graph.get_attr(name)
        with gm.graph.inserting_after(mask_node):
            masked = gm.graph.call_function(aten.mul.Tensor, (node, mask_node))
        node.replace_all_uses_with(masked, delete_user_cb=lambda user, masked=masked: user is not masked)
    gm.recompile()
    return gm
