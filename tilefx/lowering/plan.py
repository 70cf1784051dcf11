"""Which nodes of a pruned graph become which block-sparse kernels (TVM-free).

Reads only the ATen-level fx graph (``torch.export(...).module()``) and the ``BlockSparsity``
and ``Quantized`` records of ``tilefx.passes.metadata``: an ``aten.linear`` or ``aten.conv2d``
whose weight is a ``get_attr`` with a block-sparsity record becomes a kernel; so does an
``aten.linear`` whose weight has a ``Quantized`` record (block-sparse or not), together with the
fake-quant node in front of it (``passes.quant_ops``), which the int8/bf16 kernel computes
itself (``SparseLayer.quantized``, ``quant_node``); so does a linear written as
``aten.addmm`` / ``aten.mm`` / ``aten.matmul`` with a parameter operand (the forms
``passes.analysis.weight_layers`` recognises). One stored ``[in, out]`` is planned as a linear on
``weight.T`` with its record transposed (``SparseLayer.weight_transposed``; the contract is in
``passes.metadata``). Everything else stays dense torch, with a warning for sparse layers the
kernels cannot take yet (grouped convs; a bias computed in the graph, as Swin V2's attention
builds its qkv bias): their pruned zeros stay in the dense weight.
Every check that can fail (dtype, block tiling, shapes) runs here, so ``build`` raises a
``LoweringError`` naming the node before it compiles anything. Kept free of TVM so the plan can
be printed, tested and reported on machines without it.

What ``build`` decides later is recorded the same way: a new plan derived from this one
(``lowering.hand_over`` sets ``SparseLayer.transposed_output``), from which the runtime modules
are built; nothing is switched on a module after it is built.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx

from tilefx.errors import LoweringError

from ..passes.analysis.weight_layers import WeightLayer, layer_of
from ..passes.metadata import BlockSparsity, Quantized, get_metadata
from ..passes.quant_ops import FAKE_QUANT_OPS
from ..passes.quantize_linears import quantized_input
from .kernels.spec import Activation

__all__ = ["Plan", "SparseLayer", "conv_pair", "plan_graph"]

log = logging.getLogger(__name__)

_CONV2D = torch.ops.aten.conv2d.default
_LINEAR = torch.ops.aten.linear.default
_RELU = torch.ops.aten.relu.default
_GELU = torch.ops.aten.gelu.default
_SUPPORTED_DTYPES = (torch.float32,)


@dataclass(frozen=True)
class SparseLayer:
    """One fx node lowered to a kernel, with everything the kernel builder needs to know."""

    node: str
    op: Literal["linear", "conv2d"]
    weight: str
    bias: str | None
    sparsity: BlockSparsity | None  # None: a dense quantized layer
    input_shape: tuple[int, ...]
    out_features: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    fused_node: str | None = None  # the relu/gelu node the kernel's epilogue absorbs
    activation: Activation | None = None  # what that node computes
    # Linear only: the sparse linears that are the sole users of this layer's output, directly
    # or through elementwise ops; empty when anything else reads it. They may take Yᵀ.
    consumers: tuple[str, ...] = ()
    # Decided by ``lowering.hand_over`` once the kernels are chosen (False in ``plan_graph``'s
    # plan): the layer writes Yᵀ for its consumers. Its runtime module is built with it.
    transposed_output: bool = False
    # The parameter is stored [in, out] (addmm / mm / matmul): the kernel's weight is its transpose,
    # and ``sparsity`` is already stated on that [out, in] view.
    weight_transposed: bool = False
    # The weight's ``Quantized`` record (int8 or bf16 kernels), and the fake-quant node feeding the
    # linear, which the lowered module replaces along with it.
    quantized: Quantized | None = None
    quant_node: str | None = None

    @property
    def block(self) -> tuple[int, int]:
        if self.sparsity is None:
            raise ValueError(f"node {self.node} is a dense quantized layer: it has no block")
        return self.sparsity.block


@dataclass(frozen=True)
class Plan:
    layers: tuple[SparseLayer, ...]

    def layer(self, node: str) -> SparseLayer:
        return next(layer for layer in self.layers if layer.node == node)


def plan_graph(gm: torch.fx.GraphModule, *, fuse_activations: bool = True) -> Plan:
    """The kernels ``gm`` lowers to. Raises ``LoweringError`` for a sparse layer we cannot run."""
    metadata = get_metadata(gm)
    layers = []
    for node in gm.graph.nodes:
        layer = layer_of(gm, node)
        if layer is None or layer.kind == "conv" and node.target != _CONV2D:
            continue
        records = metadata.of(layer.param, BlockSparsity)
        quantized = metadata.of(layer.param, Quantized)
        if not records and not quantized:
            continue
        why_dense = _no_kernel_for(node, layer.bias)
        if why_dense is not None:
            log.warning("node %s: %s, it stays dense torch", node.name, why_dense)
            continue
        record = (records[-1].transposed() if layer.transposed else records[-1]) if records else None
        planned = _plan_node(gm, layer, record, fuse_activations)
        if quantized:
            planned = _with_quantization(layer, planned, quantized[-1])
        layers.append(planned)
    layers = _with_consumers(gm, layers)
    log.debug("planned %d sparse layers", len(layers))
    return Plan(tuple(layers))


#: Elementwise ops that keep their input's memory layout, so a transposed activation passes
#: through them unchanged on its way from one sparse linear to the next.
_LAYOUT_KEEPING = frozenset(
    {
        torch.ops.aten.gelu.default,
        torch.ops.aten.relu.default,
        torch.ops.aten.silu.default,
        torch.ops.aten.sigmoid.default,
        torch.ops.aten.tanh.default,
    }
)


def _no_kernel_for(node: torch.fx.Node, bias: torch.fx.Node | None) -> str | None:
    """Why a block-sparse layer has no kernel (it then stays dense torch, its zeros in place)."""
    groups = node.args[6] if node.target == _CONV2D and len(node.args) > 6 else 1
    if groups != 1:
        return f"grouped conv (groups={groups}) has no block-sparse kernel"
    if bias is not None and bias.op != "get_attr":
        return f"its bias is computed in the graph (by {bias.name!r}), the kernels take a stored one"
    return None


def _with_quantization(layer: WeightLayer, planned: SparseLayer, record: Quantized) -> SparseLayer:
    """``planned`` with its ``Quantized`` record and the fake-quant node the kernel absorbs.

    The graph must say what the record says: a linear read in its stored orientation, fed by the
    record's fake-quant op with the record's grid. Anything else is a graph edited after the
    pass, and a kernel built from the record would compute something else.
    """
    where = f"node {layer.node.name!r} (weight {layer.param!r})"
    if layer.node.target != _LINEAR or layer.transposed:
        raise LoweringError(
            f"{where}: a Quantized record is lowered only on aten.linear, got {layer.node.target}"
        )
    fake = quantized_input(layer.node)
    expected = FAKE_QUANT_OPS[(record.format, record.scheme)]
    if fake is None or fake.target != expected:
        found = fake.target if fake is not None else "no fake-quant node"
        raise LoweringError(
            f"{where}: its Quantized record ({record.format}, {record.scheme}) needs {expected} in front "
            f"of the linear, the graph has {found}; rerun tilefx.optimize instead of editing its graph"
        )
    if (
        record.format == "int8"
        and record.scheme == "static"
        and tuple(fake.args[1:])
        != (
            record.act_scale,
            record.act_zero_point,
        )
    ):
        raise LoweringError(f"{where}: the static grid in the graph {fake.args[1:]} differs from its record")
    return dataclasses.replace(planned, quantized=record, quant_node=fake.name)


def _with_consumers(gm: torch.fx.GraphModule, layers: list[SparseLayer]) -> list[SparseLayer]:
    """``layers`` with ``consumers`` filled in for fp32 linears whose output only feeds sparse linears
    (quantized linears read a fake-quant node, so they are never a hand-over's reader)."""
    linears = {layer.node for layer in layers if layer.op == "linear" and layer.quantized is None}
    nodes = {node.name: node for node in gm.graph.nodes}
    done = []
    for layer in layers:
        if layer.node in linears:
            output = nodes[layer.fused_node or layer.node]
            consumers = _sparse_consumers(output, linears)
            if consumers:
                log.debug("node %s feeds only sparse linears %s", layer.node, consumers)
                layer = dataclasses.replace(layer, consumers=consumers)
        done.append(layer)
    return done


def _sparse_consumers(output: torch.fx.Node, linears: set[str]) -> tuple[str, ...]:
    """The sparse linears reading ``output`` (through layout-keeping ops); () if anything else does."""
    found: list[str] = []
    pending = [output]
    while pending:
        value = pending.pop()
        for user in value.users:
            if user.op == "call_function" and user.target in _LAYOUT_KEEPING and user.args[0] is value:
                pending.append(user)
            elif user.name in linears and user.args[0] is value and value not in user.args[1:]:
                found.append(user.name)
            else:
                return ()
    return tuple(dict.fromkeys(found))


def _plan_node(
    gm: torch.fx.GraphModule, layer: WeightLayer, record: BlockSparsity | None, fuse_activations: bool
) -> SparseLayer:
    node, weight_name = layer.node, layer.param
    weight = _attr(gm, weight_name)
    if layer.transposed:
        weight = weight.t()
    where = f"node {node.name!r} (weight {weight_name!r})"
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise LoweringError(
            f"{where}: block-sparse kernels support float32, got {weight.dtype}; cast the model first"
        )
    out, rest = weight.shape[0], math.prod(weight.shape[1:])
    if record is not None:
        _check_record(record, out, rest, where)
    bias = _bias_name(gm, layer.bias, out, where)
    input_shape = _input_shape(layer.input, where)
    fused = _fusable_activation(node) if fuse_activations else None
    if layer.kind == "linear":
        if input_shape[-1] != rest:
            raise LoweringError(f"{where}: input has {input_shape[-1]} features, the weight expects {rest}")
        fused_node, kind = fused if fused else (None, None)
        return SparseLayer(
            node.name,
            "linear",
            weight_name,
            bias,
            record,
            input_shape,
            out,
            fused_node=fused_node,
            activation=kind,
            weight_transposed=layer.transposed,
        )
    return _plan_conv(node, record, weight, bias, input_shape, fused, where)


def _check_record(record: BlockSparsity, out: int, rest: int, where: str) -> None:
    rows, cols = record.block
    if rows <= 0 or cols <= 0 or out % rows or rest % cols:
        raise LoweringError(
            f"{where}: block {record.block} does not tile the weight's matrix view {(out, rest)}"
        )
    if tuple(record.mask.shape) != (out // rows, rest // cols):
        raise LoweringError(
            f"{where}: block mask {tuple(record.mask.shape)} does not match the grid {(out // rows, rest // cols)}"
        )


def _plan_conv(
    node: torch.fx.Node,
    record: BlockSparsity | None,
    weight: torch.Tensor,
    bias: str | None,
    input_shape: tuple[int, ...],
    fused: tuple[str, Activation] | None,
    where: str,
) -> SparseLayer:
    args = [*node.args, *([None] * 7)][:7]
    stride, padding, dilation = conv_pair(args[3], 1), conv_pair(args[4], 0), conv_pair(args[5], 1)
    if isinstance(args[4], str):
        raise LoweringError(
            f"{where}: string padding {args[4]!r} is not supported; export with explicit padding"
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
        fused_node=fused[0] if fused else None,
        activation=fused[1] if fused else None,
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


def _input_shape(source: torch.fx.Node, where: str) -> tuple[int, ...]:
    value = source.meta.get("val")
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


def _fusable_activation(node: torch.fx.Node) -> tuple[str, Activation] | None:
    """(name, kind) of the relu or exact GELU consuming ``node`` alone, which the epilogue absorbs.

    Folding it saves a pass over Y. GELU's tanh approximation is left to torch.
    """
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_function":
        return None
    user = users[0]
    if user.target == _RELU:
        return user.name, "relu"
    approximate = user.kwargs.get("approximate", user.args[1] if len(user.args) > 1 else "none")
    if user.target == _GELU and approximate == "none":
        return user.name, "gelu"
    return None


def conv_pair(value: Any, default: int) -> tuple[int, int]:
    """A conv's stride/padding/dilation argument as (h, w): None, an int, or a 1- or 2-list."""
    if value is None:
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    items = [int(v) for v in value]
    return (items[0], items[0]) if len(items) == 1 else (items[0], items[1])
