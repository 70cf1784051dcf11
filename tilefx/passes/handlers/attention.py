"""Attention: q·kᵀ couples query and key channels; matmuls between activations contract dims."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx

from .api import Channels, Context, ParamRef
from .layers import linear_like
from .registry import handles

aten = torch.ops.aten


@handles(aten.scaled_dot_product_attention.default)
def sdpa(node: torch.fx.Node, ctx: Context) -> Channels | None:
    """q, k, v are [..., heads, tokens, head_dim]. Channels along head_dim: q and k are one
    (their product is summed over it), v's flow to the output. Channels along heads: q, k and v
    are one. Removing head dims would change the default scale 1/√d, so it is pinned."""
    q, k, v = (ctx.channels(a) for a in node.args[:3])
    rank = len(ctx.shape(node.args[0]))
    if q is None or k is None or v is None or q.dim != k.dim or q.dim not in (rank - 1, rank - 3):
        ctx.freeze_inputs(node, f"node {ctx.where()}: attention inputs without matching channel dims")
        return None
    ctx.union(q.ids, k.ids)
    if q.dim == rank - 3:
        if v.dim != q.dim:
            ctx.freeze_inputs(node, f"node {ctx.where()}: heads pruned in q/k but not in v")
            return None
        ctx.union(q.ids, v.ids)
    if _mask_has_channels(node, ctx):
        ctx.freeze_inputs(node, f"node {ctx.where()}: the attention mask carries channels")
    if (
        q.dim == rank - 1
        and node.kwargs.get("scale") is None
        and (len(node.args) < 7 or node.args[6] is None)
    ):
        scale = 1.0 / math.sqrt(ctx.shape(node.args[0])[-1])
        q_ids = q.ids
        ctx.on_prune(lambda kept: _pin_scale(node, scale) if not kept(q_ids).all() else None)
    return Channels(v.dim, v.ids)


def _mask_has_channels(node: torch.fx.Node, ctx: Context) -> bool:
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    return ctx.channels(mask) is not None


def _pin_scale(node: torch.fx.Node, scale: float) -> None:
    node.kwargs = {**node.kwargs, "scale": scale}


@handles(aten.matmul.default, aten.bmm.default, aten.mm.default)
def matmul(node: torch.fx.Node, ctx: Context) -> Channels | None:
    """``a @ b`` over [..., M, K] × [..., K, N]: K channels are one, M and N and batch dims pass.
    With a parameter on the right it is a linear layer."""
    a, b = node.args[:2]
    if isinstance(ctx.value(b), ParamRef):
        return linear_like(node, ctx, a, b, in_dim=-2, out_dim=-1)
    ca, cb = ctx.channels(a), ctx.channels(b)
    ra, rb, ro = len(ctx.shape(a)), len(ctx.shape(b)), len(ctx.shape(node))
    if ra < 2 or rb < 2:
        ctx.freeze_inputs(node, f"node {ctx.where()}: matrix-vector product")
        return None
    out: Channels | None = None
    if ca is not None and cb is not None and ca.dim == ra - 1 and cb.dim == rb - 2:
        ctx.union(ca.ids, cb.ids)  # contracted
        return None
    for channels, rank, contracted, kept_dim in ((ca, ra, ra - 1, ro - 2), (cb, rb, rb - 2, ro - 1)):
        if channels is None:
            continue
        if channels.dim == contracted:
            ctx.freeze(channels.ids, f"node {ctx.where()}: contracted against unknown channels")
            continue
        dim = kept_dim if channels.dim >= rank - 2 else channels.dim + (ro - rank)
        out = _join(ctx, out, Channels(dim, channels.ids))
    return out


def _join(ctx: Context, out: Channels | None, new: Channels) -> Channels:
    if out is None:
        return new
    if out.dim == new.dim:
        ctx.union(out.ids, new.ids)
        return out
    ctx.freeze(np.concatenate([out.ids, new.ids]), f"node {ctx.where()}: result would carry two channel dims")
    return out


__all__ = ["matmul", "sdpa"]
