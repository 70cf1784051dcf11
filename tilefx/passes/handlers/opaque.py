"""Pooling, reductions, and ops whose channel flow tilefx does not model.

The last kind is explicit, never a guess: such an op freezes every channel that touches it.
"""

from __future__ import annotations

import torch
import torch.fx

from .api import Channels, Context, int_arg, ints_arg, op_arg
from .registry import handles

aten = torch.ops.aten

_SPATIAL = (
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default, aten.avg_pool1d.default,
    aten.avg_pool2d.default, aten.avg_pool3d.default, aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default, aten.adaptive_max_pool2d.default,
    aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec,
)  # fmt: skip
_REDUCTIONS = (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default)
_NO_CHANNELS = (
    aten.arange.default, aten.arange.start, aten.arange.start_step, aten.new_zeros.default,
    aten.new_ones.default, aten.new_full.default, aten.zeros.default, aten.ones.default, aten.full.default,
    aten.zeros_like.default, aten.ones_like.default, aten._assert_tensor_metadata.default,
    aten.scalar_tensor.default, aten.sym_size.int,
)  # fmt: skip
_UNMODELED = (
    aten.einsum.default, aten.gather.default, aten.cumsum.default, aten.diff.default,
    aten.linalg_vector_norm.default, aten.sort.default, aten.topk.default, aten.argmax.default,
    aten.index_select.default, aten.scatter.src, aten.fill_.Tensor, aten.fill_.Scalar, aten.zero_.default,
    aten.copy_.default, aten.index_put_.default, aten.var.correction, aten.std.correction,
    aten.nonzero.default, aten.repeat.default, aten.tile.default, aten.pixel_shuffle.default,
)  # fmt: skip


@handles(*_SPATIAL)
def spatial(node: torch.fx.Node, ctx: Context) -> Channels | None:
    """Pooling and resizing act per channel on the trailing spatial dims."""
    value = ctx.channels(node.args[0])
    if isinstance(value, Channels) and value.dim >= len(ctx.shape(node.args[0])) - _spatial_rank(node):
        ctx.freeze(value.ids, f"node {ctx.where()}: pools over the channel dim")
        return None
    return value


def _spatial_rank(node: torch.fx.Node) -> int:
    name = str(node.target)
    return 1 if "1d" in name else 3 if "3d" in name else 2


@handles(*_REDUCTIONS)
def reduction(node: torch.fx.Node, ctx: Context) -> Channels | None:
    """Reducing other dims keeps the channels; reducing the channel dim would mix them: frozen."""
    value = ctx.channels(node.args[0])
    if value is None:
        return None
    rank = len(ctx.shape(node.args[0]))
    reduced = set(range(rank)) if not op_arg(node, 1) else {d % rank for d in ints_arg(node, 1)}
    keepdim = bool(op_arg(node, 2, "keepdim", False))
    if value.dim in reduced:
        ctx.freeze(value.ids, f"node {ctx.where()}: reduces over the channel dim")
        return None
    shift = 0 if keepdim else sum(1 for d in reduced if d < value.dim)
    return Channels(value.dim - shift, value.ids)


@handles(aten.softmax.int, aten._softmax.default, aten.log_softmax.int)
def softmax(node: torch.fx.Node, ctx: Context) -> Channels | None:
    value = ctx.channels(node.args[0])
    if value is not None and int_arg(node, 1) % len(ctx.shape(node.args[0])) == value.dim:
        ctx.freeze(value.ids, f"node {ctx.where()}: softmax normalises over the channel dim")
    return value


@handles(*_NO_CHANNELS)
def no_channels(node: torch.fx.Node, ctx: Context) -> None:
    """Creation ops and shape queries: their results carry no channel identity."""
    return None


@handles(*_UNMODELED)
def unmodeled(node: torch.fx.Node, ctx: Context) -> None:
    """Known ops whose channel flow is not modelled: every channel touching them is frozen."""
    ctx.freeze_inputs(node, f"node {ctx.where()} ({node.target}) is not modelled for channel pruning")
    return None


@handles(aten.full_like.default, aten.empty_like.default)
def like(node: torch.fx.Node, ctx: Context) -> Channels | None:
    """A new tensor shaped like its input (T5 fills its position buckets with ``full_like``).

    It follows the input's shape when channels are removed, so its positions are the input's
    channels; each holds the same fill (empty_like: none), so any subset of them is exact.
    """
    return ctx.channels(node.args[0])
