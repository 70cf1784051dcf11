"""Shape ops: views, permutes, slices, concatenation and splits.

Instead of index arithmetic per op, each op is run on a *label tensor* that holds every
position's channel id, so channels move exactly as the data does (flatten spreads a channel over
H·W, a head split spreads one over heads, a channel shuffle interleaves). Size arguments that
mention channels are recorded and shrunk after pruning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.fx

from ..analysis.channel_groups import Channels, Context, KeptCounter, ParamRef
from . import handles

aten = torch.ops.aten

_RELABEL = (
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.permute.default, aten.transpose.int, aten.swapaxes.default, aten.t.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.expand.default,
    aten.expand_as.default, aten.select.int, aten.slice.Tensor, aten.narrow.default, aten.roll.default,
    aten.flip.default, aten.movedim.int,
)  # fmt: skip
_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)


def _run(node: Any, ctx: Context, source: torch.Tensor) -> Any:
    """Apply the node's op to ``source`` in place of its first argument (other tensors: zeros)."""
    first = node.args[0]

    def substitute(arg: torch.fx.Node) -> Any:
        return source if arg is first else torch.zeros(ctx.shape(arg), dtype=source.dtype)

    args = torch.fx.node.map_arg(node.args, substitute)
    kwargs = torch.fx.node.map_arg(node.kwargs, substitute)
    return node.target(*args, **kwargs)


@handles(*_RELABEL)
def relabel(node: Any, ctx: Context) -> Any:
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


def _feeds_attention(node: Any, depth: int = 4) -> bool:
    """Whether ``node`` reaches an attention product through layout-only ops."""
    for user in node.users:
        if user.target in _ATTENTION:
            return True
        if depth and user.target in _LAYOUT_ONLY and _feeds_attention(user, depth - 1):
            return True
    return False


def _op_dim(node: Any, rank: int) -> int | None:
    """The dim a select/slice/narrow works on (None for other ops)."""
    if node.target in (aten.select.int, aten.narrow.default):
        return int(node.args[1]) % rank
    if node.target == aten.slice.Tensor:
        return int(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % rank
    return None


def _channel_dim_op_ok(node: Any, ctx: Context, value: Channels) -> bool:
    """select/slice/narrow along the channel dim: keep indices consistent after pruning."""
    ids = value.ids
    if node.target == aten.select.int:
        index = int(node.args[2]) % len(ids)
        ctx.freeze(ids[index : index + 1], f"node {ctx.where()}: selects this channel")
        ctx.on_prune(lambda kept: _set(node, 2, int(kept(ids[:index]).sum())))
        return True
    if node.target == aten.narrow.default:
        start, length = int(node.args[2]) % len(ids), int(node.args[3])
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


def _slice_bounds(node: Any, size: int) -> tuple[int, int, int]:
    args = list(node.args) + [None] * (5 - len(node.args))
    start, end, step = args[2] or 0, args[3], args[4] or 1
    end = size if end is None or end > size else end
    return int(start) % (size + 1), int(end) % (size + 1) if end < 0 else int(end), int(step)


def _record_sizes(node: Any, ctx: Context, out: Channels) -> None:
    """Explicit sizes that name the channel dim shrink with it."""
    ids, dim = out.ids, out.dim
    if node.target in (
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.expand.default,
    ):
        sizes = list(node.args[1])
        if sizes[dim] != -1:
            ctx.on_prune(lambda kept: _set(node, 1, [*sizes[:dim], int(kept(ids).sum()), *sizes[dim + 1 :]]))
    elif node.target == aten.unflatten.int:
        start, sizes = int(node.args[1]) % len(ctx.shape(node.args[0])), list(node.args[2])
        if start <= dim < start + len(sizes) and sizes[dim - start] != -1:
            i = dim - start
            ctx.on_prune(lambda kept: _set(node, 2, [*sizes[:i], int(kept(ids).sum()), *sizes[i + 1 :]]))


@handles(*_SPLITS)
def split(node: Any, ctx: Context) -> Any:
    value = ctx.value(node.args[0])
    if not isinstance(value, Channels):
        return None
    parts = _run(node, ctx, ctx.labels(node.args[0]))
    outs = [ctx.derive(p) for p in parts]
    rank = len(ctx.shape(node.args[0]))
    dim = int(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % rank
    if node.target == aten.unbind.int:
        dim = int(node.args[1] if len(node.args) > 1 else 0) % rank
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
def cat(node: Any, ctx: Context) -> Channels | None:
    """Concatenation: along channels the ids are concatenated; along another dim the inputs'
    channels are one (parameters among the inputs, like ViT's class token, get sliced)."""
    inputs: Sequence[Any] = node.args[0]
    rank = len(ctx.shape(inputs[0]))
    dim = int(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % (
        rank + (node.target == aten.stack.default)
    )
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
    stacked = node.target(labels, dim)
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
def pad(node: Any, ctx: Context) -> Any:
    value = ctx.value(node.args[0])
    if not isinstance(value, Channels):
        return None
    widths, rank = list(node.args[1]), len(ctx.shape(node.args[0]))
    padded = {rank - 1 - i for i in range(len(widths) // 2) if widths[2 * i] or widths[2 * i + 1]}
    if value.dim in padded:
        ctx.freeze(value.ids, f"node {ctx.where()}: pads the channel dim")
        return None
    return value


@handles(aten.index.Tensor)
def index(node: Any, ctx: Context) -> Any:
    """Advanced indexing: supported for a parameter indexed on its leading dim (e.g. swin's
    relative position table); channels of an activation that is gathered are frozen."""
    source, indices = ctx.value(node.args[0]), node.args[1]
    if isinstance(source, ParamRef) and len(indices) == 1 and indices[0] is not None:
        lead = len(ctx.shape(node)) - (len(source.origin) - 1)
        return ParamRef(source.target, (None,) * lead + source.origin[1:])
    if isinstance(source, Channels):
        ctx.freeze(source.ids, f"node {ctx.where()}: gathers along an indexed dim")
    return None


def _param_view(node: Any, ctx: Context, ref: ParamRef) -> ParamRef:
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


def _set(node: Any, index: int, value: Any) -> None:
    args = list(node.args)
    args[index] = value
    node.args = tuple(args)


def _set_many(node: Any, values: dict[int, Any]) -> None:
    args = list(node.args) + [None] * (max(values) + 1 - len(node.args))
    for i, v in values.items():
        args[i] = v
    node.args = tuple(args)
