"""Which nodes of a pruned graph become which block-sparse kernels (TVM-free).

Reads only the ATen-level fx graph (``torch.export(...).module()``) and the ``BlockSparsity``
records of ``tilefx.passes.metadata``: an ``aten.linear`` or ``aten.conv2d`` whose weight is a
``get_attr`` with a block-sparsity record becomes a kernel; everything else stays dense torch.
Every check that can fail (dtype, block tiling, shapes, groups) runs here, so ``build`` raises a
``LoweringError`` naming the node before it compiles anything. Kept free of TVM so the plan can
be printed, tested and reported on machines without it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx

from ..passes.infra.errors import LoweringError
from ..passes.metadata import BlockSparsity, get_metadata

__all__ = ["Plan", "SparseLayer", "plan_graph"]

log = logging.getLogger(__name__)

_LINEAR = torch.ops.aten.linear.default
_CONV2D = torch.ops.aten.conv2d.default
_RELU = torch.ops.aten.relu.default
_SUPPORTED_DTYPES = (torch.float32,)


@dataclass(frozen=True)
class SparseLayer:
    """One fx node lowered to a kernel, with everything the kernel builder needs to know."""

    node: str
    op: Literal["linear", "conv2d"]
    weight: str
    bias: str | None
    sparsity: BlockSparsity
    input_shape: tuple[int, ...]
    out_features: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    fused_relu: str | None = None  # name of the relu node the kernel's epilogue absorbs

    @property
    def block(self) -> tuple[int, int]:
        return self.sparsity.block


@dataclass(frozen=True)
class Plan:
    layers: tuple[SparseLayer, ...]

    def layer(self, node: str) -> SparseLayer:
        return next(layer for layer in self.layers if layer.node == node)


def plan_graph(gm: torch.fx.GraphModule, *, fuse_relu: bool = True) -> Plan:
    """The kernels ``gm`` lowers to. Raises ``LoweringError`` for a sparse layer we cannot run."""
    metadata = get_metadata(gm)
    layers = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (_LINEAR, _CONV2D):
            continue
        weight_node = node.args[1]
        if not isinstance(weight_node, torch.fx.Node) or weight_node.op != "get_attr":
            continue
        records = metadata.of(str(weight_node.target), BlockSparsity)
        if not records:
            continue
        layers.append(_plan_node(gm, node, records[-1], fuse_relu))
    log.debug("planned %d sparse layers", len(layers))
    return Plan(tuple(layers))


def _plan_node(
    gm: torch.fx.GraphModule, node: torch.fx.Node, record: BlockSparsity, fuse_relu: bool
) -> SparseLayer:
    weight_name = str(node.args[1].target)  # type: ignore[union-attr]
    weight = _attr(gm, weight_name)
    where = f"node {node.name!r} (weight {weight_name!r})"
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise LoweringError(
            f"{where}: block-sparse kernels support float32, got {weight.dtype}; cast the model first"
        )
    rows, cols = record.block
    out, rest = weight.shape[0], math.prod(weight.shape[1:])
    if rows <= 0 or cols <= 0 or out % rows or rest % cols:
        raise LoweringError(
            f"{where}: block {record.block} does not tile the weight's matrix view {(out, rest)}"
        )
    if tuple(record.mask.shape) != (out // rows, rest // cols):
        raise LoweringError(
            f"{where}: block mask {tuple(record.mask.shape)} does not match the grid {(out // rows, rest // cols)}"
        )
    bias_node = node.args[2] if len(node.args) > 2 else None
    bias = _bias_name(gm, bias_node, out, where)
    input_shape = _input_shape(node, where)
    relu = _fusable_relu(node) if fuse_relu else None
    if node.target == _LINEAR:
        if input_shape[-1] != rest:
            raise LoweringError(f"{where}: input has {input_shape[-1]} features, the weight expects {rest}")
        return SparseLayer(node.name, "linear", weight_name, bias, record, input_shape, out, fused_relu=relu)
    return _plan_conv(node, record, weight, bias, input_shape, relu, where)


def _plan_conv(
    node: torch.fx.Node,
    record: BlockSparsity,
    weight: torch.Tensor,
    bias: str | None,
    input_shape: tuple[int, ...],
    relu: str | None,
    where: str,
) -> SparseLayer:
    args = [*node.args, *([None] * 7)][:7]
    stride, padding, dilation, groups = (
        _pair(args[3], 1),
        _pair(args[4], 0),
        _pair(args[5], 1),
        args[6] or 1,
    )
    if isinstance(args[4], str):
        raise LoweringError(
            f"{where}: string padding {args[4]!r} is not supported; export with explicit padding"
        )
    if groups != 1:
        raise LoweringError(
            f"{where}: grouped conv (groups={groups}) has no block-sparse kernel; drop its BlockSparsity record"
        )
    if len(input_shape) != 4 or input_shape[1] != weight.shape[1]:
        raise LoweringError(
            f"{where}: input {input_shape} does not match the weight {tuple(weight.shape)} (NCHW expected)"
        )
    return SparseLayer(
        node.name,
        "conv2d",
        str(node.args[1].target),  # type: ignore[union-attr]
        bias,
        record,
        input_shape,
        int(weight.shape[0]),
        kernel=(int(weight.shape[2]), int(weight.shape[3])),
        stride=stride,
        padding=padding,
        dilation=dilation,
        fused_relu=relu,
    )


def _attr(gm: torch.fx.GraphModule, name: str) -> torch.Tensor:
    value: Any = gm
    for part in name.split("."):
        value = getattr(value, part)
    return value


def _bias_name(gm: torch.fx.GraphModule, bias_node: Any, out: int, where: str) -> str | None:
    if bias_node is None:
        return None
    if not isinstance(bias_node, torch.fx.Node) or bias_node.op != "get_attr":
        raise LoweringError(f"{where}: bias must be a parameter (get_attr), got {bias_node}")
    bias = _attr(gm, str(bias_node.target))
    if bias.dtype not in _SUPPORTED_DTYPES or tuple(bias.shape) != (out,):
        raise LoweringError(f"{where}: bias must be float32 [{out}], got {bias.dtype} {tuple(bias.shape)}")
    return str(bias_node.target)


def _input_shape(node: torch.fx.Node, where: str) -> tuple[int, ...]:
    source = node.args[0]
    value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    if not isinstance(value, torch.Tensor):
        raise LoweringError(
            f"{where}: input shape unknown; capture the model with torch.export so nodes carry meta['val']"
        )
    if value.dtype not in _SUPPORTED_DTYPES:
        raise LoweringError(f"{where}: block-sparse kernels support float32 inputs, got {value.dtype}")
    try:
        return tuple(int(d) for d in value.shape)
    except (TypeError, ValueError) as exc:  # symbolic (dynamic) dims cannot be converted
        raise LoweringError(
            f"{where}: dynamic input shape {tuple(value.shape)}; export with static shapes"
        ) from exc


def _fusable_relu(node: torch.fx.Node) -> str | None:
    """The relu consuming ``node`` alone: folding it into the epilogue saves a pass over Y."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target == _RELU:
        return users[0].name
    return None


def _pair(value: Any, default: int) -> tuple[int, int]:
    if value is None:
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    items = [int(v) for v in value]
    return (items[0], items[0]) if len(items) == 1 else (items[0], items[1])
