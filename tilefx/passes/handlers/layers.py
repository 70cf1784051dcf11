"""Layers that create channels: convolutions, linear maps, embeddings.

A layer's output channels are fresh identities (its filters, role "out"); its weight's input
dim is sliced with the identities of the channels it reads (role "in").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx
from torch.fx.node import Argument

from .api import Channels, Context, ParamRef, Role, int_arg, op_arg
from .registry import handles

aten = torch.ops.aten

_CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


@handles(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
def conv(node: torch.fx.Node, ctx: Context) -> Channels:
    """Dense, grouped and depthwise convolutions.

    Grouped: each group keeps the same positions (``groups`` stays; per-group widths shrink).
    Depthwise (one input channel per group): an input channel and its outputs go together, and
    the ``groups`` argument shrinks with them.
    """
    x, weight, bias = (op_arg(node, i, _CONV_NAMES[i]) for i in range(3))
    groups = int_arg(node, 6, _CONV_NAMES[6], 1)
    cout, cin_per_group = ctx.shape(weight)[:2]
    in_ids = ctx.ids_on(x, 1)
    if groups == 1:
        out_ids = ctx.fresh(cout)
        ctx.use(weight, 1, in_ids, "in")
    elif cin_per_group == 1:
        out_ids = np.repeat(in_ids, cout // groups)
        ctx.on_prune(lambda kept: _set_arg(node, 6, int(kept(in_ids).sum())))
    else:
        in_grid = in_ids.reshape(groups, cin_per_group)
        ctx.union(np.broadcast_to(in_grid[:1], in_grid.shape), in_grid)
        out_ids = ctx.fresh(cout)
        out_grid = out_ids.reshape(groups, cout // groups)
        ctx.union(np.broadcast_to(out_grid[:1], out_grid.shape), out_grid)
        ctx.use(weight, 1, in_grid[0], "in")
    ctx.use(weight, 0, out_ids, "out")
    if bias is not None:
        ctx.use(bias, 0, out_ids, "other")
    return Channels(1, out_ids)


def _set_arg(node: torch.fx.Node, index: int, value: Argument) -> None:
    args = list(node.args)
    if len(args) <= index:
        kwargs = dict(node.kwargs)
        kwargs[_CONV_NAMES[index]] = value
        node.kwargs = kwargs
        return
    args[index] = value
    node.args = tuple(args)


@handles(aten.linear.default)
def linear(node: torch.fx.Node, ctx: Context) -> Channels:
    x, weight = node.args[0], node.args[1]
    bias = op_arg(node, 2, "bias")
    rank = len(ctx.shape(x))
    ctx.use(weight, 1, ctx.ids_on(x, rank - 1), "in")
    out_ids = ctx.fresh(ctx.shape(weight)[0])
    ctx.use(weight, 0, out_ids, "out")
    if bias is not None:
        ctx.use(bias, 0, out_ids, "other")
    return Channels(rank - 1, out_ids)


@handles(aten.addmm.default)
def addmm(node: torch.fx.Node, ctx: Context) -> Channels | None:
    """``bias + x @ W`` with W stored [in, out] (transformers' Conv1D, e.g. GPT-2)."""
    bias, x, weight = node.args[:3]
    if not isinstance(ctx.value(weight), ParamRef):
        ctx.freeze_inputs(node, f"node {ctx.where()}: addmm of two activations")
        return None
    out = linear_like(node, ctx, x, weight, in_dim=0, out_dim=1)
    ctx.use(bias, 0, out.ids, "other")
    return out


def linear_like(
    node: torch.fx.Node, ctx: Context, x: Argument, weight: Argument, in_dim: int, out_dim: int
) -> Channels:
    """``x @ W`` (W a parameter, ``in_dim``/``out_dim`` its dims): fresh output channels on x's last dim.

    W may be the parameter seen through a transpose (``x @ W.T``): each dim is then traced back to
    the parameter dim it reads.
    """
    rank, w_rank = len(ctx.shape(x)), len(ctx.shape(weight))
    _use_weight(ctx, weight, in_dim % w_rank, ctx.ids_on(x, rank - 1), "in")
    out_ids = ctx.fresh(ctx.shape(weight)[out_dim])
    _use_weight(ctx, weight, out_dim % w_rank, out_ids, "out")
    return Channels(len(ctx.shape(node)) - 1, out_ids)


def _use_weight(ctx: Context, weight: Argument, dim: int, ids: np.ndarray, role: Role) -> None:
    """:meth:`Context.use` for a get_attr weight, or one seen through a plain transpose of it."""
    ref = ctx.value(weight)
    is_attr = isinstance(weight, torch.fx.Node) and weight.op == "get_attr"
    origin = ref.origin[dim] if isinstance(ref, ParamRef) and not is_attr else None
    if origin is None or not np.array_equal(origin[1], np.arange(len(origin[1]))):
        ctx.use(weight, dim, ids, role)  # a get_attr, or frozen as computed
        return
    ctx.use_target(ref.target, origin[0], ids, role)  # type: ignore[union-attr]


@handles(aten.embedding.default)
def embedding(node: torch.fx.Node, ctx: Context) -> Channels:
    weight = node.args[0]
    out_ids = ctx.fresh(ctx.shape(weight)[1])
    ctx.use(weight, 1, out_ids, "out")
    return Channels(len(ctx.shape(node)) - 1, out_ids)


__all__ = ["addmm", "conv", "embedding", "linear", "linear_like"]
