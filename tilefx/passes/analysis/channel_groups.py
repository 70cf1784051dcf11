"""Coupled channels: which channels of which parameters must be removed (or permuted) together.

The analysis walks the ATen graph once, asking each op's handler (``passes/handlers``; the API
they share with this module, :class:`~tilefx.passes.handlers.api.Context` and the values it
carries, is ``passes/handlers/api.py``) how channel *identities* flow through it. Identities
live in a union-find: a residual add, a depthwise conv or q·kᵀ in attention declares two channel
positions to be one; a concat or a flatten only rearranges them. Each resulting class is one
prunable *unit*; units that touch the same parameters form a :class:`ChannelGroup`, the thing a
ratio applies to. Removing a unit means slicing every :class:`ParamSlice` position of it —
producers' filters, consumers' input channels, norm parameters, biases — and resizing the shape
arguments that mention it.

An op with no handler is an :class:`UnsupportedOpError` naming the node, unless the recipe lists
it in ``skip``: then the channels touching it are frozen, never guessed to be element-wise.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
from torch._ops import OpOverload

from tilefx.errors import UnsupportedOpError

from ..handlers import HANDLERS
from ..handlers.api import (
    Attention,
    Channels,
    Context,
    KeptCounter,
    NodeValue,
    ParamRef,
    PruneHook,
    Role,
    UnionFind,
    Use,
)
from ..infra.analysis_manager import Analysis, AnalysisManager
from .shapes import Shapes

__all__ = [
    "ChannelGroup",
    "ChannelGroups",
    "ChannelGroupsAnalysis",
    "ChannelTrace",
    "ParamSlice",
]


@dataclass(frozen=True, eq=False)
class ParamSlice:
    """Where a group's units live in one parameter: ``positions[u]`` along ``dim`` belong to unit u.

    role: "out" = a producer's output channels (filters: the usual importance source),
    "in" = a consumer's input channels, "other" = norms, biases, embeddings, additive params.
    """

    target: str
    dim: int
    positions: np.ndarray  # int64 [units, k]
    role: Role


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Units that must be removed together; ``frozen`` groups may not be pruned (``reason`` says why)."""

    id: int
    units: int
    slices: tuple[ParamSlice, ...]
    nodes: tuple[str, ...]  # fx nodes whose outputs carry these channels
    frozen: bool = False
    reason: str | None = None

    def slices_by_role(self, role: Role) -> tuple[ParamSlice, ...]:
        return tuple(s for s in self.slices if s.role == role)


@dataclass(frozen=True, eq=False)
class ChannelGroups:
    """The analysis result: every group of the graph, frozen ones included.

    ``roots[g]`` are group g's unit ids in the union-find of ``trace`` (unit u ↔ ``roots[g][u]``).
    """

    groups: tuple[ChannelGroup, ...]
    trace: ChannelTrace
    roots: tuple[np.ndarray, ...]

    def prunable(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if not g.frozen)


@dataclass(frozen=True, eq=False)
class ChannelTrace:
    """Everything the analysis learned, for passes that act on it (prune, permute, mask)."""

    uf: UnionFind
    values: dict[str, NodeValue]
    uses: tuple[Use, ...]
    hooks: tuple[PruneHook, ...]

    def kept_lookup(self, removed_roots: np.ndarray) -> KeptCounter:
        keep = np.ones(len(self.uf.parent), dtype=bool)
        keep[removed_roots] = False
        return lambda ids: keep[self.uf.find(np.asarray(ids, dtype=np.int64))]


@dataclass(frozen=True)
class ChannelGroupsAnalysis(Analysis[ChannelGroups]):
    """Coupled channel groups of a graph. ``skip``: op or node names whose channels are frozen
    instead of raising UnsupportedOpError; ``protect``: parameter-name prefixes never pruned;
    ``attention``: a unit is one head dim in every head ("head_dims") or a whole head ("heads")."""

    skip: tuple[str, ...] = ()
    protect: tuple[str, ...] = ()
    attention: Attention = "head_dims"

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> ChannelGroups:
        ctx = Context(gm, am.get(Shapes()), self.attention)
        for node in gm.graph.nodes:
            ctx.node = node
            ctx.values[node.name] = self._visit(node, ctx)
        for use in ctx.uses:
            if any(use.target == p or use.target.startswith(p.rstrip(".") + ".") for p in self.protect):
                ctx.freeze(use.ids, f"parameter {use.target!r} is protected")
        return _build_groups(ctx)

    def _visit(self, node: torch.fx.Node, ctx: Context) -> NodeValue:
        if node.op == "placeholder":
            return None  # model inputs: identities are created (frozen) where a layer reads them
        if node.op == "get_attr":
            value = getattr_path(ctx.gm, str(node.target))
            if not isinstance(value, torch.Tensor):
                return None
            return ParamRef(str(node.target), tuple((d, np.arange(n)) for d, n in enumerate(value.shape)))
        if node.op == "output":
            ctx.freeze_inputs(node, "model output: its shape must not change")
            return None
        if node.op == "call_function" and node.target is operator.getitem:
            source = ctx.value(node.args[0])
            index = node.args[1]
            return source[index] if isinstance(source, (list, tuple)) and isinstance(index, int) else None
        handler = (
            HANDLERS.get(node.target)
            if node.op == "call_function" and isinstance(node.target, OpOverload)
            else None
        )
        if handler is not None:
            return handler(node, ctx)
        if _skipped(node, self.skip):
            ctx.freeze_inputs(node, f"node {node.name!r} ({node.target}) is listed in Recipe.skip")
            return None
        raise UnsupportedOpError(
            f"no channel handler for node {node.name!r} ({node.op} {node.target}); add one in "
            f"tilefx/passes/handlers, or list {_op_name(node)!r} in Recipe(skip=...) to freeze its channels",
            node=node.name,
            target=str(node.target),
        )


def getattr_path(obj: object, target: str) -> object:
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _op_name(node: torch.fx.Node) -> str:
    return str(node.target).removesuffix(".default")


def _skipped(node: torch.fx.Node, skip: tuple[str, ...]) -> bool:
    names = {node.name, str(node.target), _op_name(node), str(node.target).rsplit(".", 1)[0]}
    return any(s in names for s in skip)


def _build_groups(ctx: Context) -> ChannelGroups:
    uf = ctx.uf
    frozen: dict[int, str] = {}
    for i, why in uf.frozen.items():
        frozen.setdefault(int(uf.find(np.array([i]))[0]), why)
    first_use: dict[tuple[str, int], tuple[Use, np.ndarray]] = {}
    signature: dict[int, set[tuple[str, int]]] = {}
    for use in ctx.uses:
        found = uf.find(use.ids)
        first_use.setdefault((use.target, use.dim), (use, found))
        for root in np.unique(found).tolist():
            signature.setdefault(root, set()).add((use.target, use.dim))
    for part, ids in ctx.partitions:  # units of one group have as many positions in every part
        part_roots, counts = np.unique(uf.find(ids), return_counts=True)
        for root, count in zip(part_roots.tolist(), counts.tolist(), strict=True):
            if root in signature:
                signature[root].add((part, count))
    by_signature: dict[tuple[frozenset[tuple[str, int]], bool], list[int]] = {}
    for root, sig in signature.items():
        by_signature.setdefault((frozenset(sig), root in frozen), []).append(root)
    ordered = sorted(by_signature.items(), key=lambda kv: min(kv[1]))
    group_of = {root: gid for gid, (_, roots) in enumerate(ordered) for root in roots}
    nodes: dict[int, list[str]] = {}
    for name, value in ctx.values.items():
        if isinstance(value, Channels):
            for gid in sorted({group_of[r] for r in np.unique(uf.find(value.ids)).tolist() if r in group_of}):
                nodes.setdefault(gid, []).append(name)
    groups, group_roots = [], []
    for gid, ((signature_key, is_frozen), roots) in enumerate(ordered):
        roots_arr = np.array(sorted(roots), dtype=np.int64)
        group_roots.append(roots_arr)
        slices, ragged = _slices(
            [u for key, u in first_use.items() if key in signature_key], roots_arr
        )  # graph order
        reason: str | None = (
            frozen[int(roots_arr[0])]
            if is_frozen
            else ("units span unequal numbers of positions" if ragged else None)
        )
        if ragged:  # a ragged slice is left out of ``slices``: permuting the others would be wrong
            for root in roots:
                uf.fixed_order.setdefault(int(root), "units span unequal numbers of positions")
        groups.append(
            ChannelGroup(gid, len(roots), slices, tuple(nodes.get(gid, ())), reason is not None, reason)
        )
    trace = ChannelTrace(uf, ctx.values, tuple(ctx.uses), tuple(ctx.hooks))
    return ChannelGroups(tuple(groups), trace, tuple(group_roots))


def _slices(uses: list[tuple[Use, np.ndarray]], roots: np.ndarray) -> tuple[tuple[ParamSlice, ...], bool]:
    """Positions of each unit in each parameter dim, found with one sort per dim."""
    slices, ragged = [], False
    for use, found in uses:
        order = np.argsort(found, kind="stable")
        starts = np.searchsorted(found[order], roots, "left")
        ends = np.searchsorted(found[order], roots, "right")
        if len(set((ends - starts).tolist())) != 1:
            ragged = True
            continue
        # a stable sort keeps each unit's positions ascending
        per_unit = order[starts[:, None] + np.arange(int(ends[0] - starts[0]))[None, :]]
        slices.append(ParamSlice(use.target, use.dim, per_unit.astype(np.int64), use.role))
    return tuple(slices), ragged
