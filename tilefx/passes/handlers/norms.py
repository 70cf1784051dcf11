"""Normalisations: per-channel ones follow their channels; ones with statistics across channels
(layer/group norm) can be permuted but not pruned exactly, so their channels are frozen."""

from __future__ import annotations

import torch
import torch.fx

from ..graph_utils import BATCH_NORM
from .api import Channels, Context, list_arg
from .registry import handles

aten = torch.ops.aten


@handles(BATCH_NORM)
def batch_norm(node: torch.fx.Node, ctx: Context) -> Channels:
    x = node.args[0]
    ids = ctx.ids_on(x, 1)
    for param in node.args[1:5]:
        if param is not None:
            ctx.use(param, 0, ids, "other")
    return Channels(1, ids)


@handles(aten.layer_norm.default)
def layer_norm(node: torch.fx.Node, ctx: Context) -> Channels | None:
    """Mean and variance run over the normalised dims: removing a channel there changes every
    output, so those channels are frozen for pruning (permuting them is still exact)."""
    x, normalized_shape = node.args[0], list_arg(node, 1)
    weight = node.args[2] if len(node.args) > 2 else None
    bias = node.args[3] if len(node.args) > 3 else None
    found = ctx.channels(x)
    rank = len(ctx.shape(x))
    first_normalized = rank - len(normalized_shape)
    if found is None:
        return None
    if found.dim < first_normalized:
        return found
    ctx.freeze(found.ids, f"node {ctx.where()}: layer norm statistics span these channels", permutable=True)
    for param in (weight, bias):
        if param is not None:
            ctx.use(param, found.dim - first_normalized, found.ids, "other")
    return found


@handles(aten.group_norm.default)
def group_norm(node: torch.fx.Node, ctx: Context) -> Channels | None:
    found = ctx.channels(node.args[0])
    if found is not None:
        ctx.freeze(found.ids, f"node {ctx.where()}: group norm statistics span channel groups")
    return found
