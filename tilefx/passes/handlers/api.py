"""The handler API: what a channel handler reads, declares and returns.

The channel-group analysis (``passes/analysis/channel_groups.py``) walks the graph with one
:class:`Context` and asks each op's handler (``passes/handlers/*``) what its output carries:
:class:`Channels` (channel identities along one dim), a :class:`ParamRef` (a parameter seen
through shape ops), a list of Channels for multi-output ops, or None. Both sides import this
module; it imports neither.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.fx
from torch.fx.node import Argument

from tilefx.errors import UnsupportedOpError

__all__ = [
    "Attention",
    "Channels",
    "Context",
    "KeptCounter",
    "NodeValue",
    "ParamRef",
    "PruneHook",
    "Role",
    "UnionFind",
    "Use",
    "as_int",
    "int_arg",
    "ints_arg",
    "list_arg",
    "op_arg",
]

#: The unit of a split feeding attention: one head dim in every head, or a whole head.
Attention = Literal["head_dims", "heads"]

Role = Literal["out", "in", "other"]


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


NodeValue = Channels | ParamRef | list[Channels | None] | None
"""What a node's output carries through the analysis (a list: one entry per output of a multi-output op)."""


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
    role: Role


KeptCounter = Callable[[np.ndarray], np.ndarray]  # ids -> bool mask of kept positions
PruneHook = Callable[[KeptCounter], None]


class Context:
    """What handlers see while the analysis walks the graph (see ``passes/handlers``)."""

    def __init__(
        self, gm: torch.fx.GraphModule, shapes: dict[str, tuple[int, ...]], attention: Attention = "head_dims"
    ) -> None:
        self.gm = gm
        self.shapes = shapes
        self.attention = attention  # "head_dims" or "heads": the unit of a split feeding attention
        self.uf = UnionFind()
        self.values: dict[str, NodeValue] = {}
        self.uses: list[Use] = []
        self.hooks: list[PruneHook] = []
        self.partitions: list[tuple[str, np.ndarray]] = []
        self.node: torch.fx.Node | None = None

    # reading -----------------------------------------------------------------------------
    def value(self, arg: object) -> NodeValue:
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

    def use(self, arg: object, dim: int, ids: np.ndarray, role: Role) -> None:
        """Positions along ``dim`` of the parameter read by get_attr node ``arg`` carry ``ids``."""
        if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr"):
            self.freeze(ids, f"node {self.where()}: its weight {arg} is computed, not a parameter")
            return
        self.use_target(str(arg.target), dim, ids, role)

    def use_target(self, target: str, dim: int, ids: np.ndarray, role: Role) -> None:
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
    """The dims along which ``labels`` is not constant (compared by broadcasting: no expanded copy)."""
    return [
        d
        for d in range(labels.dim())
        if labels.shape[d] > 1 and bool((labels != labels.narrow(d, 0, 1)).any())
    ]


def _along(labels: torch.Tensor, dim: int) -> torch.Tensor:
    index = [0] * labels.dim()
    index[dim] = slice(None)  # type: ignore[call-overload]
    return labels[tuple(index)]


# reading op arguments: typed, and an UnsupportedOpError naming the node where the type is wrong ----
def op_arg(node: torch.fx.Node, index: int, name: str | None = None, default: Argument = None) -> Argument:
    """Argument ``index`` of ``node``, else its keyword ``name``, else ``default``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default) if name is not None else default


def as_int(node: torch.fx.Node, value: Argument) -> int:
    """``value``, an argument of ``node``, as an int."""
    if isinstance(value, (int, torch.SymInt)):
        return int(value)
    raise _unexpected(node, "an int", value)


def int_arg(node: torch.fx.Node, index: int, name: str | None = None, default: int | None = None) -> int:
    """An int argument; ``default`` where it is absent or None."""
    value = op_arg(node, index, name)
    return default if value is None and default is not None else as_int(node, value)


def list_arg(node: torch.fx.Node, index: int, name: str | None = None) -> list[Argument]:
    """A list argument (sizes, tensors to concatenate, indices)."""
    value = op_arg(node, index, name)
    if isinstance(value, (list, tuple)):
        return list(value)
    raise _unexpected(node, "a list", value)


def ints_arg(node: torch.fx.Node, index: int, name: str | None = None) -> list[int]:
    """An int-list argument such as dims; a lone int reads as a list of one."""
    if isinstance(op_arg(node, index, name), (int, torch.SymInt)):
        return [int_arg(node, index, name)]
    return [as_int(node, v) for v in list_arg(node, index, name)]


def _unexpected(node: torch.fx.Node, expected: str, value: Argument) -> UnsupportedOpError:
    return UnsupportedOpError(
        f"node {node.name!r} ({node.target}): expected {expected} argument, got {value!r}",
        node=node.name,
        target=str(node.target),
    )
