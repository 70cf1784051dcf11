"""Reorder channel dimensions by folding permutations into weights, so inference needs no gather.

A coupled channel group is permuted as one: the producers' output channels, every consumer's
input channels, norm parameters and biases all move together (residual groups share one order,
concatenations compose block-diagonally, grouped convs permute within groups, a flatten moves
each channel's H·W block). The model computes exactly what it did before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.fx

from tilefx.errors import RecipeError

from .analysis.channel_groups import ChannelGroup, ChannelGroups, ChannelGroupsAnalysis
from .graph_utils import attr_tensor, set_attr_tensor
from .infra.analysis_manager import AnalysisManager
from .infra.pass_base import Numerics, PassBase, PassResult
from .infra.preconditions import require_aten_graph
from .metadata import Permutation, get_metadata, set_metadata

__all__ = ["OrderPlanner", "ReorderDimsPass", "group_key", "permutable_groups"]

log = logging.getLogger(__name__)

# (graph module, its channel groups, the permutable ones) -> {group id: order of units}
OrderPlanner = Callable[
    [torch.fx.GraphModule, ChannelGroups, Sequence[ChannelGroup]], Mapping[int, np.ndarray]
]


@dataclass(frozen=True)
class ReorderDimsPass(PassBase):
    """Permute channel groups with orders from ``planner`` (e.g. TETRIS) or explicit ``orders``.

    ``orders`` maps a group's key (:func:`group_key`: the first producer weight it slices, like
    ``"layer1.0.conv1.weight"``) to a unit order: new unit i is old unit ``order[i]``. Groups that
    may not be reordered (model inputs/outputs, selected or gathered channels) are left alone; an
    explicit order for one of them is an error naming the reason.
    Records a :class:`Permutation` per parameter dim. Exact.
    Requires: an ATen-level graph (checked: :class:`PreconditionError`).

    Deviation from TETRIS as published (runtime gathers): orders are only ever chosen for groups
    that can be folded, so no gather is needed; groups that cannot be folded keep their order
    and are reported (logged at INFO with the reason).
    """

    orders: Mapping[str, Sequence[int]] = field(default_factory=dict, compare=False, hash=False)
    planner: OrderPlanner | None = field(default=None, compare=False, hash=False)
    skip: tuple[str, ...] = ()

    numerics: ClassVar[Numerics] = "exact"

    def requires(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> None:
        require_aten_graph(self.name, gm)

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        groups = am.get(ChannelGroupsAnalysis(self.skip))
        movable = permutable_groups(groups)
        fixed = [g for g in groups.groups if g.units > 1 and g.slices and g not in movable]
        for group in fixed:
            log.info("ReorderDimsPass: %s keeps its order: %s", group_key(group), _why_fixed(groups, group))
        chosen = dict(self.planner(gm, groups, movable)) if self.planner is not None else {}
        chosen.update(self._explicit(groups, movable))
        chosen = {gid: np.asarray(o) for gid, o in chosen.items() if not np.array_equal(o, np.arange(len(o)))}
        if not chosen:
            return PassResult(gm, modified=False)
        fold(gm, groups, chosen)
        return PassResult(gm, modified=True)

    def _explicit(self, groups: ChannelGroups, movable: Sequence[ChannelGroup]) -> dict[int, np.ndarray]:
        by_key = {group_key(g): g for g in groups.groups}
        allowed = {g.id for g in movable}
        out = {}
        for key, order in self.orders.items():
            group = by_key.get(key)
            if group is None:
                raise RecipeError(
                    f"ReorderDimsPass: no channel group is keyed {key!r}; keys: {sorted(by_key)[:8]}..."
                )
            if group.id not in allowed:
                raise RecipeError(
                    f"ReorderDimsPass: group {key!r} cannot be reordered: {_why_fixed(groups, group)}"
                )
            out[group.id] = _bijection(key, order, group.units)
        return out


def group_key(group: ChannelGroup) -> str:
    """A stable, readable name for a group: its first producer weight, else ``param@dimN``."""
    outs = group.slices_by_role("out")
    if outs:
        return outs[0].target
    return f"{group.slices[0].target}@dim{group.slices[0].dim}" if group.slices else f"group{group.id}"


def permutable_groups(groups: ChannelGroups) -> list[ChannelGroup]:
    """Groups whose units may be reordered: none of their channels has a fixed position."""
    uf = groups.trace.uf
    fixed_roots = (
        set(uf.find(np.array(sorted(uf.fixed_order), dtype=np.int64)).tolist()) if uf.fixed_order else set()
    )
    return [
        g
        for g in groups.groups
        if g.units > 1 and g.slices and not fixed_roots.intersection(groups.roots[g.id].tolist())
    ]


def _why_fixed(groups: ChannelGroups, group: ChannelGroup) -> str:
    uf = groups.trace.uf
    roots = set(groups.roots[group.id].tolist())
    for i, reason in uf.fixed_order.items():
        if int(uf.find(np.array([i]))[0]) in roots:
            return reason
    return "it has a single unit or touches no parameter"


def _bijection(key: str, order: Sequence[int], units: int) -> np.ndarray:
    array = np.asarray(order, dtype=np.int64)
    if array.shape != (units,) or not np.array_equal(np.sort(array), np.arange(units)):
        raise RecipeError(f"ReorderDimsPass: order for {key!r} must be a permutation of range({units})")
    return array


def fold(gm: torch.fx.GraphModule, groups: ChannelGroups, orders: Mapping[int, np.ndarray]) -> None:
    """Apply unit orders to every parameter slice of their groups; record the net permutations."""
    index: dict[tuple[str, int], np.ndarray] = {}
    for gid, order in orders.items():
        for s in groups.groups[gid].slices:
            size = attr_tensor(gm, s.target).shape[s.dim]
            current = index.setdefault((s.target, s.dim), np.arange(size))
            moved = current.copy()
            moved[s.positions.reshape(-1)] = current[s.positions[order].reshape(-1)]
            index[(s.target, s.dim)] = moved
    metadata = get_metadata(gm)
    for (target, dim), order in index.items():
        tensor = attr_tensor(gm, target)
        picked = torch.from_numpy(order)
        set_attr_tensor(gm, target, tensor.detach().index_select(dim, picked).clone())
        metadata = metadata.reindexed(target, dim, picked, tensor.shape)
        metadata = metadata.with_annotation(target, Permutation(dim, tuple(order.tolist())))
    set_metadata(gm, metadata)


def random_planner(seed: int = 0) -> OrderPlanner:
    """Random orders for every movable group (for tests: any order must be exact)."""

    def plan(
        gm: torch.fx.GraphModule, groups: ChannelGroups, movable: Sequence[ChannelGroup]
    ) -> dict[int, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {g.id: rng.permutation(g.units) for g in movable}

    return plan
