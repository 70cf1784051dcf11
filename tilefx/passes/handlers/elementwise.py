"""Element-wise ops: channels pass straight through, or are coupled across broadcast operands."""

from __future__ import annotations

import torch
import torch.fx

from .api import Channels, Context, ParamRef
from .registry import handles

aten = torch.ops.aten

_UNARY = (
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default, aten.silu_.default,
    aten.sigmoid.default, aten.hardsigmoid.default, aten.hardswish.default, aten.hardswish_.default,
    aten.hardtanh.default, aten.hardtanh_.default, aten.tanh.default, aten.dropout.default,
    aten.dropout_.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.pow.Tensor_Scalar,
    aten.exp.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.lift_fresh_copy.default,
    aten.detach.default, aten.abs.default, aten.neg.default, aten.sqrt.default, aten.rsqrt.default,
    aten.erf.default, aten.leaky_relu.default, aten.elu.default, aten.mish.default, aten.softplus.default,
    aten.log.default, aten.reciprocal.default, aten.mul.Scalar, aten.add.Scalar, aten.div.Scalar,
    aten.sub.Scalar, aten.eq.Scalar, aten.ne.Scalar, aten.ge.Scalar, aten.le.Scalar, aten.gt.Scalar,
    aten.lt.Scalar, aten.logical_not.default, aten.bitwise_not.default,
)  # fmt: skip

_BROADCAST = (
    aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor, aten.mul.Tensor, aten.mul_.Tensor,
    aten.div.Tensor, aten.div_.Tensor, aten.maximum.default, aten.minimum.default, aten.eq.Tensor,
    aten.ne.Tensor, aten.le.Tensor, aten.ge.Tensor, aten.lt.Tensor, aten.gt.Tensor, aten.__and__.Tensor,
    aten.__or__.Tensor, aten.logical_and.default, aten.logical_or.default, aten.where.self,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor,
)  # fmt: skip


@handles(*_UNARY)
def unary(node: torch.fx.Node, ctx: Context) -> Channels | ParamRef | None:
    """Same channels out as in (a parameter seen through the op stays a parameter)."""
    value = ctx.value(node.args[0])
    return value if isinstance(value, (Channels, ParamRef)) else None


@handles(*_BROADCAST)
def broadcast(node: torch.fx.Node, ctx: Context) -> Channels | None:
    """Operands' channels on the same (broadcast-aligned) dim are one; parameters get sliced."""
    out_rank = len(ctx.shape(node))
    out: Channels | None = None
    refs: list[tuple[ParamRef, int, tuple[int, ...]]] = []
    for arg in node.all_input_nodes:
        value, shape = ctx.value(arg), ctx.shape(arg)
        offset = out_rank - len(shape)
        if isinstance(value, ParamRef):
            refs.append((value, offset, shape))
        elif isinstance(value, Channels):
            out = _merge(ctx, out, value, offset, shape, ctx.shape(node))
    if out is None:
        return None
    for arg in node.all_input_nodes:  # e.g. a model input added to a layer's output: it cannot shrink
        shape = ctx.shape(arg)
        dim = out.dim - (out_rank - len(shape))
        if ctx.value(arg) is None and dim >= 0 and shape[dim] > 1:
            ctx.freeze(out.ids, f"node {ctx.where()}: combined with a tensor of unknown channels")
    for ref, offset, shape in refs:
        dim = out.dim - offset
        if dim >= 0 and shape[dim] > 1:
            ctx.use_ref(ref, dim, out.ids)
    return out


def _merge(
    ctx: Context,
    out: Channels | None,
    value: Channels,
    offset: int,
    shape: tuple[int, ...],
    out_shape: tuple[int, ...],
) -> Channels | None:
    dim = value.dim + offset
    if shape[value.dim] == 1 and out_shape[dim] > 1:
        ctx.freeze(value.ids, f"node {ctx.where()}: a single channel is broadcast over many")
        return out
    if out is None:
        return Channels(dim, value.ids)
    if out.dim != dim:
        ctx.freeze(out.ids, f"node {ctx.where()}: operands carry channels on different dims")
        ctx.freeze(value.ids, f"node {ctx.where()}: operands carry channels on different dims")
        return out
    ctx.union(out.ids, value.ids)
    return out


# Element-wise too: T5's relative-position buckets (``torch.min``, ``torch.where`` with a scalar),
# BART's in-place causal mask fill. Scalar operands carry no channels.
_BROADCAST_MORE = (
    aten.min.other, aten.max.other, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar,
    aten.masked_fill_.Scalar, aten.masked_fill_.Tensor,
)  # fmt: skip
handles(*_BROADCAST_MORE)(broadcast)
