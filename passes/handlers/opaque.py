"""Pooling, reductions, and ops whose channel flow tilefx does not model.

The last kind is explicit, never a guess: such an op freezes every channel that touches it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..analysis.channel_groups import Channels, Context
from . import handles

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
def spatial(node: Any, ctx: Context) -> Any:
    """Pooling and resizing act per channel on the trailing spatial dims."""
    value = ctx.channels(node.args[0])
    if isinstance(value, Channels) and value.dim >= len(ctx.shape(node.args[0])) - _spatial_rank(node):
        ctx.freeze(value.ids, f"node {ctx.where()}: pools over the channel dim")
        return None
    return value


def _spatial_rank(node: Any) -> int:
    name = str(node.target)
    return 1 if "1d" in name else 3 if "3d" in name else 2


@handles(*_REDUCTIONS)
def reduction(node: Any, ctx: Context) -> Any:
    """Reducing other dims keeps the channels; reducing the channel dim would mix them: frozen."""
    value = ctx.channels(node.args[0])
    if value is None:
        return None
    rank = len(ctx.shape(node.args[0]))
    dims = node.args[1] if len(node.args) > 1 else None
    reduced = (
        set(range(rank)) if not dims else {int(d) % rank for d in ([dims] if isinstance(dims, int) else dims)}
    )
    keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    if value.dim in reduced:
        ctx.freeze(value.ids, f"node {ctx.where()}: reduces over the channel dim")
        return None
    shift = 0 if keepdim else sum(1 for d in reduced if d < value.dim)
    return Channels(value.dim - shift, value.ids)


@handles(aten.softmax.int, aten._softmax.default, aten.log_softmax.int)
def softmax(node: Any, ctx: Context) -> Any:
    value = ctx.channels(node.args[0])
    if value is not None and int(node.args[1]) % len(ctx.shape(node.args[0])) == value.dim:
        ctx.freeze(value.ids, f"node {ctx.where()}: softmax normalises over the channel dim")
    return value


@handles(*_NO_CHANNELS)
def no_channels(node: Any, ctx: Context) -> None:
    """Creation ops and shape queries: their results carry no channel identity."""
    return None


@handles(*_UNMODELED)
def unmodeled(node: Any, ctx: Context) -> None:
    """Known ops whose channel flow is not modelled: every channel touching them is frozen."""
    ctx.freeze_inputs(node, f"node {ctx.where()} ({node.target}) is not modelled for channel pruning")
    return None
