"""Coupled channels: which channels of which parameters must be removed (or permuted) together.

The analysis walks the ATen graph once, asking each op's handler (``passes/handlers``) how channel
*identities* flow through it. Identities live in a union-find: a residual add, a depthwise conv
or q·kᵀ in attention declares two channel positions to be one; a concat or a flatten only
rearranges them. Each resulting class is one prunable *unit*; units that touch the same
parameters form a :class:`ChannelGroup`, the thing a ratio applies to. Removing a unit means
slicing every :class:`ParamSlice` position of it — producers' filters, consumers' input
channels, norm parameters, biases — and resizing the shape arguments that mention it.

An op with no handler is an :class:`UnsupportedOpError` naming the node, unless the recipe lists
it in ``skip``: then the channels touching it are frozen, never guessed to be element-wise.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.fx

from ..infra.analysis_manager import Analysis, AnalysisManager
from ..infra.errors import UnsupportedOpError
from .shapes import Shapes

__all__ = [
    "ChannelGroup",
    "ChannelGroups",
    "ChannelGroupsAnalysis",
    "ChannelTrace",
    "Channels",
    "Context",
    "ParamRef",
    "ParamSlice",
    "UnionFind",
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
    role: Literal["out", "in", "other"]


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Units that must be removed together; ``frozen`` groups may not be pruned (``reason`` says why)."""

    id: int
    units: int
    slices: tuple[ParamSlice, ...]
    nodes: tuple[str, ...]  # fx nodes whose outputs carry these channels
    frozen: bool = False
    reason: str | None = None

    def slices_by_role(self, role: Literal["out", "in", "other"]) -> tuple[ParamSlice, ...]:
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
class Channels:
    """Channel identities of a tensor: position ``i`` along ``dim`` is channel ``ids[i]``.

    Ids may repeat (a flatten spreads one channel over H·W positions; a head split makes one
    head-dim position stand for all heads).
    """

    dim: int
    ids: np.ndarray


@dataclass(frozen=True, eq=False)
class ParamRef:
    """A tensor that is a parameter seen through shape ops (unsqueeze, expand, view, index, ...).

    ``origin[d]`` is ``(param_dim, positions)``: position i along dim d reads index
    ``positions[i]`` of the parameter's ``param_dim``; None where d is broadcast or mixes dims.
    """

    target: str
    origin: tuple[tuple[int, np.ndarray] | None, ...]


class UnionFind:
    """Disjoint sets over channel ids, vectorised with numpy; also tracks frozen ids."""

    def __init__(self) -> None:
        self.parent = np.zeros(0, dtype=np.int64)
        self.frozen: dict[int, str] = {}  # id -> reason it may not be pruned
        self.fixed_order: dict[int, str] = {}  # id -> reason it may not even be permuted

    def fresh(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent = np.concatenate([self.parent, np.arange(start, start + n, dtype=np.int64)])
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        roots = self.parent[ids]
        while True:
            up = self.parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        self.parent[ids] = roots
        return roots

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        a, b = a.ravel(), b.ravel()
        while True:
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return
            low, high = np.minimum(ra, rb)[differ], np.maximum(ra, rb)[differ]
            self.parent[high] = low

    def freeze(self, ids: np.ndarray, reason: str, *, permutable: bool = False) -> None:
        for i in np.unique(np.asarray(ids, dtype=np.int64)).tolist():
            self.frozen.setdefault(i, reason)
            if not permutable:
                self.fixed_order.setdefault(i, reason)


@dataclass(frozen=True, eq=False)
class Use:
    """One parameter dimension whose positions carry channel ``ids``."""

    target: str
    dim: int
    ids: np.ndarray
    role: Literal["out", "in", "other"]


PruneHook = Callable[["KeptCounter"], None]
KeptCounter = Callable[[np.ndarray], np.ndarray]  # ids -> bool mask of kept positions


class Context:
    """What handlers see while the analysis walks the graph (see ``passes/handlers``)."""

    def __init__(
        self, gm: torch.fx.GraphModule, shapes: dict[str, tuple[int, ...]], attention: str = "head_dims"
    ) -> None:
        self.gm = gm
        self.shapes = shapes
        self.attention = attention  # "head_dims" or "heads": the unit of a split feeding attention
        self.uf = UnionFind()
        self.values: dict[str, Any] = {}
        self.uses: list[Use] = []
        self.hooks: list[PruneHook] = []
        self.partitions: list[tuple[str, np.ndarray]] = []
        self.node: torch.fx.Node | None = None

    # reading -----------------------------------------------------------------------------
    def value(self, arg: object) -> Any:
        return self.values.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def channels(self, arg: object) -> Channels | None:
        value = self.value(arg)
        return value if isinstance(value, Channels) else None

    def shape(self, arg: object) -> tuple[int, ...]:
        if not isinstance(arg, torch.fx.Node) or arg.name not in self.shapes:
            raise UnsupportedOpError(f"node {self.where()}: argument {arg!r} has no known tensor shape")
        return self.shapes[arg.name]

    def ids_on(self, arg: object, dim: int) -> np.ndarray:
        """Channel ids of ``arg`` along ``dim``; fresh frozen ids if it has no identity there."""
        size = self.shape(arg)[dim]
        found = self.channels(arg)
        if found is not None and found.dim == dim % len(self.shape(arg)):
            return found.ids
        if found is not None:
            self.freeze(found.ids, f"node {self.where()}: channels arrive on dim {found.dim}, expected {dim}")
        return self.fresh(size, frozen=f"node {self.where()}: input has no channel identity on dim {dim}")

    # declaring ---------------------------------------------------------------------------
    def fresh(self, n: int, frozen: str | None = None) -> np.ndarray:
        ids = self.uf.fresh(n)
        if frozen is not None:
            self.uf.freeze(ids, frozen)
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        self.uf.union(a, b)

    def freeze(self, ids: np.ndarray, reason: str, *, permutable: bool = False) -> None:
        self.uf.freeze(ids, reason, permutable=permutable)

    def partition(self, parts: list[np.ndarray]) -> None:
        """Channels in different ``parts`` (of a split or slice) never share a group, so a permutation
        never moves a channel into a part that other ops read."""
        for j, ids in enumerate(parts):
            self.partitions.append((f"{self.where()}[{j}]", np.asarray(ids, dtype=np.int64)))

    def freeze_inputs(self, node: torch.fx.Node, reason: str) -> None:
        for arg in node.all_input_nodes:
            value = self.value(arg)
            for channels in value if isinstance(value, list) else [value]:
                if isinstance(channels, Channels):
                    self.freeze(channels.ids, reason)

    def use(self, arg: object, dim: int, ids: np.ndarray, role: Literal["out", "in", "other"]) -> None:
        """Positions along ``dim`` of the parameter read by get_attr node ``arg`` carry ``ids``."""
        if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr"):
            self.freeze(ids, f"node {self.where()}: its weight {arg} is computed, not a parameter")
            return
        self.use_target(str(arg.target), dim, ids, role)

    def use_target(self, target: str, dim: int, ids: np.ndarray, role: Literal["out", "in", "other"]) -> None:
        self.uses.append(Use(target, dim, np.asarray(ids, dtype=np.int64), role))

    def use_ref(self, ref: ParamRef, dim: int, ids: np.ndarray) -> None:
        """A parameter combined with channels along (its view's) ``dim``: slice it with them."""
        origin = ref.origin[dim]
        if origin is None:
            return  # broadcast along this dim: nothing to slice
        param_dim, positions = origin
        if len(positions) != len(ids) or sorted(positions.tolist()) != list(range(len(positions))):
            self.freeze(
                ids, f"node {self.where()}: parameter {ref.target!r} is gathered, not sliced, along channels"
            )
            return
        ordered = np.empty_like(np.asarray(ids, dtype=np.int64))
        ordered[positions] = ids
        self.use_target(ref.target, param_dim, ordered, "other")

    def on_prune(self, hook: PruneHook) -> None:
        """Run ``hook(kept)`` after pruning, e.g. to shrink a size argument of this node."""
        self.hooks.append(hook)

    # label tensors: let a shape op move channel ids exactly as it moves data -------------
    def labels(self, arg: object, like_dim: int | None = None) -> torch.Tensor:
        """An int64 tensor of ``arg``'s shape holding each position's channel id (-1 = none)."""
        shape = self.shape(arg)
        found = self.channels(arg)
        if found is None and like_dim is not None:
            found = Channels(
                like_dim, self.fresh(shape[like_dim], frozen=f"node {self.where()}: unknown channels")
            )
        if found is None:
            return torch.full(shape, -1, dtype=torch.int64)
        view = [1] * len(shape)
        view[found.dim] = -1
        return torch.from_numpy(found.ids).reshape(view).expand(shape).contiguous()

    def derive(
        self, labels: torch.Tensor, keep_dim: int | None = None, outer: bool = False
    ) -> Channels | None:
        """Read Channels back from a label tensor.

        When a view split one channel dim over several (heads × head_dim, groups × width), ids
        are unioned across all but one of them — ``keep_dim``, else the outermost (``outer``), else
        the largest — so that the kept channel set always stays a rectangular grid.
        """
        varying = _varying_dims(labels)
        if len(varying) > 1:
            if keep_dim not in varying:
                keep_dim = varying[0] if outer else max(varying, key=lambda d: (labels.shape[d], d))
            rows = labels.movedim(keep_dim, 0).reshape(labels.shape[keep_dim], -1)
            valid = rows >= 0
            if not bool(valid.all()):
                self.freeze(
                    rows[valid].numpy(), f"node {self.where()}: channels mixed with non-channel positions"
                )
                return None
            self.union(rows[:, :1].expand_as(rows).numpy(), rows.numpy())
            labels = torch.from_numpy(self.uf.find(labels.numpy()))
            varying = _varying_dims(labels)
        if not varying:
            if bool((labels >= 0).any()):
                self.freeze(
                    labels[labels >= 0].numpy(), f"node {self.where()}: a channel broadcast over a dim"
                )
            return None
        dim = varying[0]
        ids = _along(labels, dim)
        if bool((ids < 0).any()):
            self.freeze(
                ids[ids >= 0].numpy(), f"node {self.where()}: channels mixed with non-channel positions"
            )
            return None
        return Channels(dim, ids.numpy().copy())

    def where(self) -> str:
        return repr(self.node.name) if self.node is not None else "?"


def _varying_dims(labels: torch.Tensor) -> list[int]:
    return [
        d
        for d in range(labels.dim())
        if labels.shape[d] > 1 and not torch.equal(labels, labels.narrow(d, 0, 1).expand_as(labels))
    ]


def _along(labels: torch.Tensor, dim: int) -> torch.Tensor:
    index = [0] * labels.dim()
    index[dim] = slice(None)  # type: ignore[call-overload]
    return labels[tuple(index)]


@dataclass(frozen=True, eq=False)
class ChannelTrace:
    """Everything the analysis learned, for passes that act on it (prune, permute, mask)."""

    uf: UnionFind
    values: dict[str, Any]
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
    attention: Literal["head_dims", "heads"] = "head_dims"

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> ChannelGroups:
        from .. import handlers  # registers every handler family

        ctx = Context(gm, am.get(Shapes()), self.attention)
        for node in gm.graph.nodes:
            ctx.node = node
            ctx.values[node.name] = self._visit(node, ctx, handlers.HANDLERS)
        for use in ctx.uses:
            if any(use.target == p or use.target.startswith(p.rstrip(".") + ".") for p in self.protect):
                ctx.freeze(use.ids, f"parameter {use.target!r} is protected")
        return _build_groups(ctx)

    def _visit(self, node: torch.fx.Node, ctx: Context, table: dict[Any, Any]) -> Any:
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
        handler = table.get(node.target) if node.op == "call_function" else None
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


def getattr_path(obj: Any, target: str) -> Any:
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
