"""Shape ops: views, permutes, slices, concatenation and splits.

Instead of index arithmetic per op, each op is run on a *label tensor* that holds every
position's channel id, so channels move exactly as the data does (flatten spreads a channel over
H·W, a head split spreads one over heads, a channel shuffle interleaves). Size arguments that
mention channels are recorded and shrunk after pruning.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx
from torch._ops import OpOverload
from torch.fx.node import Argument

from tilefx.errors import UnsupportedOpError

from .api import Channels, Context, KeptCounter, ParamRef, as_int, int_arg, list_arg, op_arg
from .registry import handles

aten = torch.ops.aten

_RELABEL = (
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.permute.default, aten.transpose.int, aten.swapaxes.default, aten.t.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.expand.default,
    aten.expand_as.default, aten.select.int, aten.slice.Tensor, aten.narrow.default, aten.roll.default,
    aten.flip.default, aten.movedim.int,
)  # fmt: skip
_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)


def _run(node: torch.fx.Node, ctx: Context, source: torch.Tensor) -> torch.Tensor:
    """Apply the node's op to ``source`` in place of its first argument (other tensors: zeros)."""
    args, kwargs = _substituted(node, ctx, source)
    out: torch.Tensor = _op(node)(*args, **kwargs)
    return out


def _run_split(node: torch.fx.Node, ctx: Context, source: torch.Tensor) -> list[torch.Tensor]:
    """:func:`_run` for ops that return several tensors."""
    args, kwargs = _substituted(node, ctx, source)
    return list(_op(node)(*args, **kwargs))


def _substituted(
    node: torch.fx.Node, ctx: Context, source: torch.Tensor
) -> tuple[tuple[Argument, ...], dict[str, Argument]]:
    first = node.args[0]

    def substitute(value: torch.fx.Node) -> torch.Tensor:
        return source if value is first else torch.zeros(ctx.shape(value), dtype=source.dtype)

    return torch.fx.node.map_arg(node.args, substitute), dict(torch.fx.node.map_arg(node.kwargs, substitute))


def _op(node: torch.fx.Node) -> OpOverload:
    """The op overload to run on label tensors (handlers are registered for op overloads only)."""
    if not isinstance(node.target, OpOverload):
        raise UnsupportedOpError(
            f"node {node.name!r}: {node.target} is not an ATen op overload",
            node=node.name,
            target=str(node.target),
        )
    return node.target


@handles(*_RELABEL)
def relabel(node: torch.fx.Node, ctx: Context) -> Channels | ParamRef | None:
    value = ctx.value(node.args[0])
    if isinstance(value, ParamRef):
        return _param_view(node, ctx, value)
    if not isinstance(value, Channels):
        return None
    rank = len(ctx.shape(node.args[0]))
    op_dim = _op_dim(node, rank)
    if op_dim == value.dim and not _channel_dim_op_ok(node, ctx, value):
        return None
    heads = ctx.attention == "heads" and node.target in _SPLITTING_VIEWS and _feeds_attention(node)
    out = ctx.derive(_run(node, ctx, ctx.labels(node.args[0])), outer=heads)
    if out is not None:
        _record_sizes(node, ctx, out)
    return out


_SPLITTING_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int)
_LAYOUT_ONLY = (
    aten.permute.default, aten.transpose.int, aten.swapaxes.default, aten.contiguous.default, aten.clone.default,
    aten.expand.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
)  # fmt: skip
_ATTENTION = (aten.scaled_dot_product_attention.default, aten.matmul.default, aten.bmm.default)


def _feeds_attention(node: torch.fx.Node, depth: int = 4) -> bool:
    """Whether ``node`` reaches an attention product through layout-only ops."""
    for user in node.users:
        if user.target in _ATTENTION:
            return True
        if depth and user.target in _LAYOUT_ONLY and _feeds_attention(user, depth - 1):
            return True
    return False


def _op_dim(node: torch.fx.Node, rank: int) -> int | None:
    """The dim a select/slice/narrow works on (None for other ops)."""
    if node.target in (aten.select.int, aten.narrow.default):
        return int_arg(node, 1) % rank
    if node.target == aten.slice.Tensor:
        return int_arg(node, 1, "dim", 0) % rank
    return None


def _channel_dim_op_ok(node: torch.fx.Node, ctx: Context, value: Channels) -> bool:
    """select/slice/narrow along the channel dim: keep indices consistent after pruning."""
    ids = value.ids
    if node.target == aten.select.int:
        index = int_arg(node, 2) % len(ids)
        ctx.freeze(ids[index : index + 1], f"node {ctx.where()}: selects this channel")
        ctx.on_prune(lambda kept: _set(node, 2, int(kept(ids[:index]).sum())))
        return True
    if node.target == aten.narrow.default:
        start, length = int_arg(node, 2) % len(ids), int_arg(node, 3)
        ctx.partition([ids[start : start + length]])
        ctx.on_prune(
            lambda kept: _set_many(
                node, {2: int(kept(ids[:start]).sum()), 3: int(kept(ids[start : start + length]).sum())}
            )
        )
        return True
    start, end, step = _slice_bounds(node, len(ids))
    if step != 1:
        ctx.freeze(ids, f"node {ctx.where()}: strided slice over channels")
        return False
    ctx.partition([ids[start:end]])
    ctx.on_prune(
        lambda kept: _set_many(node, {2: int(kept(ids[:start]).sum()), 3: int(kept(ids[:end]).sum())})
    )
    return True


def _slice_bounds(node: torch.fx.Node, size: int) -> tuple[int, int, int]:
    start, step, end_arg = int_arg(node, 2, default=0), int_arg(node, 4, default=1), op_arg(node, 3)
    end = size if end_arg is None else min(as_int(node, end_arg), size)
    return start % (size + 1), end % (size + 1) if end < 0 else end, step


def _record_sizes(node: torch.fx.Node, ctx: Context, out: Channels) -> None:
    """Explicit sizes that name the channel dim shrink with it."""
    ids, dim = out.ids, out.dim
    if node.target in (
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.expand.default,
    ):
        sizes = list_arg(node, 1)
        if sizes[dim] != -1:
            ctx.on_prune(lambda kept: _set(node, 1, [*sizes[:dim], int(kept(ids).sum()), *sizes[dim + 1 :]]))
    elif node.target == aten.unflatten.int:
        start, sizes = int_arg(node, 1) % len(ctx.shape(node.args[0])), list_arg(node, 2)
        if start <= dim < start + len(sizes) and sizes[dim - start] != -1:
            i = dim - start
            ctx.on_prune(lambda kept: _set(node, 2, [*sizes[:i], int(kept(ids).sum()), *sizes[i + 1 :]]))


@handles(*_SPLITS)
def split(node: torch.fx.Node, ctx: Context) -> list[Channels | None] | None:
    value = ctx.value(node.args[0])
    if not isinstance(value, Channels):
        return None
    parts = _run_split(node, ctx, ctx.labels(node.args[0]))
    outs = [ctx.derive(p) for p in parts]
    rank = len(ctx.shape(node.args[0]))
    dim = int_arg(node, 2, "dim", 0) % rank
    if node.target == aten.unbind.int:
        dim = int_arg(node, 1, default=0) % rank
    if dim != value.dim:
        return outs
    if node.target == aten.unbind.int:
        ctx.freeze(value.ids, f"node {ctx.where()}: unbinds channels one by one")
        return outs
    pieces = [p.ids for p in outs if p is not None]
    if len(pieces) != len(outs):
        ctx.freeze(value.ids, f"node {ctx.where()}: a split part carries no channels")
        return outs
    ctx.partition(pieces)

    def resize(kept: KeptCounter) -> None:
        node.target = aten.split_with_sizes.default
        node.args = (node.args[0], [int(kept(p).sum()) for p in pieces], dim)
        node.kwargs = {}

    ctx.on_prune(resize)
    return outs


@handles(aten.cat.default, aten.stack.default)
def cat(node: torch.fx.Node, ctx: Context) -> Channels | None:
    """Concatenation: along channels the ids are concatenated; along another dim the inputs'
    channels are one (parameters among the inputs, like ViT's class token, get sliced)."""
    inputs = list_arg(node, 0)
    rank = len(ctx.shape(inputs[0]))
    dim = int_arg(node, 1, "dim", 0) % (rank + (node.target == aten.stack.default))
    found = [ctx.channels(a) for a in inputs]
    reference = next((c for c in found if c is not None), None)
    if reference is None:
        return None
    labels = []
    for arg, channels in zip(inputs, found, strict=True):
        if channels is None:
            ids = ctx.fresh(ctx.shape(arg)[reference.dim])
            value = ctx.value(arg)
            if isinstance(value, ParamRef) and reference.dim != dim:
                ctx.use_ref(value, reference.dim, ids)
            else:
                ctx.freeze(ids, f"node {ctx.where()}: concatenated with a tensor of unknown channels")
            channels = Channels(reference.dim, ids)
        labels.append(_labels_of(ctx.shape(arg), channels))
    stacked = _op(node)(labels, dim)
    keep = (
        None
        if dim == reference.dim
        else reference.dim + (node.target == aten.stack.default and dim <= reference.dim)
    )
    return ctx.derive(stacked, keep_dim=keep)


def _labels_of(shape: tuple[int, ...], channels: Channels) -> torch.Tensor:
    view = [1] * len(shape)
    view[channels.dim] = -1
    return torch.from_numpy(channels.ids).reshape(view).expand(shape).contiguous()


@handles(aten.pad.default, aten.constant_pad_nd.default)
def pad(node: torch.fx.Node, ctx: Context) -> Channels | None:
    value = ctx.value(node.args[0])
    if not isinstance(value, Channels):
        return None
    widths, rank = list_arg(node, 1), len(ctx.shape(node.args[0]))
    padded = {rank - 1 - i for i in range(len(widths) // 2) if widths[2 * i] or widths[2 * i + 1]}
    if value.dim in padded:
        ctx.freeze(value.ids, f"node {ctx.where()}: pads the channel dim")
        return None
    return value


@handles(aten.index.Tensor)
def index(node: torch.fx.Node, ctx: Context) -> ParamRef | None:
    """Advanced indexing: supported for a parameter indexed on its leading dim (e.g. swin's
    relative position table); channels of an activation that is gathered are frozen."""
    source, indices = ctx.value(node.args[0]), list_arg(node, 1)
    if isinstance(source, ParamRef) and len(indices) == 1 and indices[0] is not None:
        lead = len(ctx.shape(node)) - (len(source.origin) - 1)
        return ParamRef(source.target, (None,) * lead + source.origin[1:])
    if isinstance(source, Channels):
        ctx.freeze(source.ids, f"node {ctx.where()}: gathers along an indexed dim")
    return None


def _param_view(node: torch.fx.Node, ctx: Context, ref: ParamRef) -> ParamRef:
    """Track which parameter dim and index each dim of the result reads."""
    shape = ctx.shape(node.args[0])
    origin: list[tuple[int, np.ndarray] | None] = [None] * len(ctx.shape(node))
    for d, found in enumerate(ref.origin):
        if found is None or shape[d] == 1:
            continue
        param_dim, positions = found
        labels = _labels_of(shape, Channels(d, positions))
        out = _run(node, ctx, labels)
        varying = [
            e
            for e in range(out.dim())
            if out.shape[e] > 1 and not torch.equal(out, out.narrow(e, 0, 1).expand_as(out))
        ]
        if len(varying) == 1:
            index = [0] * out.dim()
            index[varying[0]] = slice(None)  # type: ignore[call-overload]
            origin[varying[0]] = (param_dim, out[tuple(index)].numpy().copy())
    return ParamRef(ref.target, tuple(origin))


def _set(node: torch.fx.Node, index: int, value: Argument) -> None:
    args = list(node.args)
    args[index] = value
    node.args = tuple(args)


def _set_many(node: torch.fx.Node, values: dict[int, Argument]) -> None:
    args = list(node.args) + [None] * (max(values) + 1 - len(node.args))
    for i, v in values.items():
        args[i] = v
    node.args = tuple(args)


# ``W.T`` of a 2-D tensor (a hand-written ``x @ W.T``) moves data exactly as ``t`` does.
handles(aten.numpy_T.default)(relabel)
