"""A whole pruned model as one Relax program whose linear and conv layers call our kernels.

``relax_program`` exports the optimized graph with ``torch.export`` (ATen ops kept whole:
``run_ep_decomposition=False`` leaves ``aten.linear`` / ``aten.conv2d`` for the plan to key on)
and imports it with TVM's ``from_exported_program``. Through ``custom_convert_map`` every
float32 ``linear`` and ungrouped ``conv2d`` with a stored weight becomes a ``call_tir`` to one of
our block-sparse kernels (``lowering.schedules.cpu``), its packed weight a Relax constant:

* a layer the plan lowers (``lowering.plan``) keeps its pruner's block mask;
* every other such layer is packed at full density (every block stored). TVM 0.27's CPU
  pipeline leaves dense matmul and conv as naive loops; our templates at full density are
  within reach of torch's GEMM, so the dense part of the model does not make the artifact slow.

A quantized layer (``Quantized`` record, ``lowering.narrow``) becomes a ``call_tir`` of its int8
or bf16 kernel (block-sparse where a template takes its blocks, else dense) with the codes,
scales, column sums and static grid as Relax constants; the fake-quant node in front of it
is folded (the kernel quantizes X itself). A fake-quant node feeding anything else is computed
with Relax ops, as the torch graph computes it.

A relu or exact GELU that is the only user of a layer is folded into the kernel's epilogue.
Whatever else remains (attention's batched matmuls, norms, softmax, elementwise) is TVM's own
legalised TIR; ``relax_pipeline`` gives it the dlight CPU rules and parallelises the loop nests
no rule takes (``schedules.cpu_generic``). An op the importer does not know is an
``UnsupportedOpError`` naming the node, raised before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.relax.frontend.torch import from_exported_program
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

from tilefx.errors import CaptureError, LoweringError, UnsupportedOpError

from ..runtime.packing import pack_bsr
from . import compat
from .kernels.bf16_common import round_bf16_func
from .kernels.spec import Activation, Conv2dGeometry, KernelSpec
from .narrow import check_narrow_target, narrow_options, narrow_spec, pack_narrow
from .plan import SparseLayer, conv_pair, plan_graph
from .schedules.cpu import cpu_kernel
from .schedules.cpu_generic import schedule_leftovers

__all__ = ["ExportedLayer", "RelaxProgram", "relax_pipeline", "relax_program"]

log = logging.getLogger(__name__)

_LINEAR = "linear.default"
_CONV2D = "conv2d.default"
#: TIR op pattern "opaque": keeps FuseOps from fusing anything into our scheduled kernels.
_OPAQUE = 8


@dataclass(frozen=True)
class ExportedLayer:
    """One layer of the artifact that runs one of our kernels (for the manifest and the report)."""

    node: str
    op: str
    weight: str
    block: tuple[int, int]
    stored_blocks: int
    total_blocks: int
    pruned: bool  # False: a dense layer packed at full density
    activation: Activation | None
    kernel: str
    number_format: str = "fp32"


@dataclass(frozen=True)
class RelaxProgram:
    """The imported Relax module with what went into it."""

    module: tvm.IRModule
    layers: tuple[ExportedLayer, ...]
    input_names: tuple[str, ...]
    output_count: int


def relax_program(
    gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor], target: tvm.target.Target
) -> RelaxProgram:
    """``gm`` (a ``tilefx.optimize`` result) as a Relax module calling our kernels on ``target``.

    Requires: an ATen-level graph with static shapes, float32 layers; a CPU (llvm) target.
    Raises ``UnsupportedOpError`` naming the first node TVM's importer has no converter for,
    ``LoweringError`` for a target other than llvm or a layer that cannot be packed, and
    ``CaptureError`` when ``torch.export`` cannot re-export the graph.
    """
    if compat.is_cuda(target):
        raise LoweringError("export supports llvm targets only; CUDA artifacts are not built yet")
    plan = plan_graph(gm)
    check_narrow_target(plan.layers, False, lambda: compat.cpu_features(target))
    pruned = {
        layer.weight: layer
        for layer in plan.layers
        if not layer.weight_transposed and layer.quantized is None
    }
    quantized = {
        layer.weight: layer
        for layer in plan.layers
        if layer.quantized is not None and narrow_options(layer).dense
    }
    program = _export(gm, example_inputs)
    converters = _Converters(program, pruned, target, quantized)
    _check_supported(program, ExportedProgramImporter().create_convert_map(), converters.table())
    module = from_exported_program(program, run_ep_decomposition=False, custom_convert_map=converters.table())
    names = tuple(spec.arg.name for spec in program.graph_signature.input_specs if _is_user_input(spec))
    outputs = len(program.graph_signature.user_outputs)
    log.info("export: %d layers run our kernels", len(converters.layers))
    return RelaxProgram(module, tuple(converters.layers), names, outputs)


def relax_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's CPU pipeline with schedules for the legalised TIR between our kernels."""
    cpu = cpu_pipeline

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            passes = (
                cpu.library_dispatch_passes(target)
                + cpu.legalize_passes(target)
                + [schedule_leftovers(target)]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            result: tvm.IRModule = tvm.transform.Sequential(passes)(mod)
        return result

    return pipeline


def _export(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Any:
    try:
        return torch.export.export(gm, tuple(example_inputs))
    except Exception as exc:  # torch.export raises many types; ours must be typed
        raise CaptureError(f"export: torch.export of the optimized graph failed: {exc}") from exc


def _is_user_input(spec: Any) -> bool:
    return bool(spec.kind == torch.export.graph_signature.InputKind.USER_INPUT)


def _check_supported(program: Any, known: dict[str, Any], custom: dict[str, Any]) -> None:
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name not in known and name not in custom:
            raise UnsupportedOpError(
                f"export: node {node.name!r} ({node.target}) has no converter in TVM's Relax importer; "
                "rewrite the model around it or run the optimized graph from torch (tilefx.compile)",
                node=node.name,
                target=str(node.target),
            )


class _Converters:
    """The ``custom_convert_map`` entries: layers to kernels, folded activations to their layer."""

    def __init__(
        self,
        program: Any,
        pruned: dict[str, Any],
        target: tvm.target.Target,
        quantized: dict[str, SparseLayer] | None = None,
    ) -> None:
        self.program = program
        self.pruned = pruned
        self.quantized = quantized or {}
        self.target = target
        self.params = dict(program.graph_signature.inputs_to_parameters)
        self.params.update(program.graph_signature.inputs_to_buffers)
        self.state = {**dict(program.named_parameters()), **dict(program.named_buffers())}
        self.defaults: dict[str, Callable[[torch.fx.Node], relax.Expr]] = {}
        self.layers: list[ExportedLayer] = []
        self.kernels: dict[KernelSpec, tvm.ir.GlobalVar] = {}
        self.helpers: dict[str, tvm.ir.GlobalVar] = {}
        self.folded: set[str] = set()  # activation nodes whose producer's kernel computes them

    def table(self) -> dict[str, Callable[[torch.fx.Node, Any], relax.Expr]]:
        return {
            _LINEAR: self.layer,
            _CONV2D: self.layer,
            "fake_quant_rows.default": self.fake_quant,
            "fake_quant_tensor.default": self.fake_quant,
            "round_bf16.default": self.fake_quant,
            "relu.default": self.activation,
            "gelu.default": self.activation,
            "to.device": self.to_device,
            "scaled_dot_product_attention.default": self.attention,
            "embedding.default": self.embedding,
        }

    @staticmethod
    def embedding(node: torch.fx.Node, importer: Any) -> relax.Expr:
        """Rows of the table; an id out of range gives NaNs, not TVM's default segfault ("fast")."""
        builder = importer.block_builder
        table, ids = importer.env[node.args[0]], importer.env[node.args[1]]
        ids_val = node.args[1].meta["val"]  # type: ignore[union-attr]
        width = int(node.args[0].meta["val"].shape[-1])  # type: ignore[union-attr]
        flat = builder.emit(relax.op.reshape(ids, (-1,)))
        rows = builder.emit(relax.op.take(table, flat, axis=0, mode="nan"))
        return builder.emit(relax.op.reshape(rows, (*(int(d) for d in ids_val.shape), width)))

    def attention(self, node: torch.fx.Node, importer: Any) -> relax.Expr:
        """``softmax(Q Kᵀ · scale + mask) V`` as matmuls, so a boolean mask works too.

        TVM's converter takes float masks only (BERT's is boolean). Causal, dropout and
        grouped-query attention go to TVM's converter (which raises for what it cannot do).
        """
        q_node, k_node, v_node = node.args[:3]
        mask_node = _arg(node, 3, node.kwargs.get("attn_mask"))
        scale = node.kwargs.get("scale", _arg(node, 6))
        plain = (
            _arg(node, 4, node.kwargs.get("dropout_p", 0.0)) == 0.0
            and not _arg(node, 5, node.kwargs.get("is_causal", False))
            and not node.kwargs.get("enable_gqa", False)
        )
        q_val = q_node.meta.get("val") if isinstance(q_node, torch.fx.Node) else None
        if not plain or not isinstance(q_val, torch.Tensor) or q_val.dtype != torch.float32:
            return self._default(node, importer)
        builder, env = importer.block_builder, importer.env
        q, k, v = env[q_node], env[k_node], env[v_node]
        ndim = q_val.dim()
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(int(q_val.shape[-1]))
        k_t = builder.emit(relax.op.permute_dims(k, [*range(ndim - 2), ndim - 1, ndim - 2]))
        scores = builder.emit(relax.op.multiply(relax.op.matmul(q, k_t), relax.const(scale, "float32")))
        if mask_node is not None:
            mask = env[mask_node]
            mask_val = mask_node.meta.get("val")
            if isinstance(mask_val, torch.Tensor) and mask_val.dtype == torch.bool:
                # TVM's converters may carry a boolean torch value as int64 (BERT's mask does).
                mask = builder.emit(relax.op.astype(mask, "bool"))
                scores = builder.emit(relax.op.where(mask, scores, relax.const(float("-inf"), "float32")))
            else:
                scores = builder.emit(relax.op.add(scores, mask))
        weights = builder.emit(relax.op.nn.softmax(scores, axis=-1))
        return builder.emit(relax.op.matmul(weights, v))

    @staticmethod
    def to_device(node: torch.fx.Node, importer: Any) -> relax.Expr:
        """``aten.to.device`` (TVM has no converter): on one CPU device it is at most a cast."""
        value = node.meta.get("val")
        x = importer.env[node.args[0]]
        if not isinstance(value, torch.Tensor) or value.device.type != "cpu":
            raise UnsupportedOpError(
                f"export: node {node.name!r} moves a tensor to {value.device if isinstance(value, torch.Tensor) else '?'}; "
                "CPU artifacts keep every tensor on the CPU",
                node=node.name,
                target=str(node.target),
            )
        return importer.block_builder.emit(relax.op.astype(x, str(value.dtype).removeprefix("torch.")))

    def activation(self, node: torch.fx.Node, importer: Any) -> relax.Expr:
        if node.name in self.folded:
            return importer.env[node.args[0]]
        return self._default(node, importer)

    def fake_quant(self, node: torch.fx.Node, importer: Any) -> relax.Expr:
        """Folded into the quantized kernels reading it (they quantize X themselves); else computed."""
        x = importer.env[node.args[0]]
        if node.users and all(self._quantized_layer(user) is not None for user in node.users):
            return x
        if getattr(node.target, "__name__", "") == "round_bf16.default":
            return self._round_bf16(x, node, importer)
        return _fake_quant_expr(importer.block_builder, x, node)

    def _round_bf16(self, x: relax.Expr, node: torch.fx.Node, importer: Any) -> relax.Expr:
        """bf16 rounding (nearest even) on the fp32 bits: Relax's bf16 cast does not round the
        way torch does (it made a 1-layer artifact differ by 4e-4 of the output scale on average)."""
        shape = tuple(int(d) for d in node.meta["val"].shape)
        size = math.prod(shape)
        name = f"tilefx_round_bf16_{size}"
        gvar = self.helpers.get(name)
        if gvar is None:
            func = round_bf16_func(size).with_attr("global_symbol", name)
            func = func.with_attr("op_pattern", _OPAQUE).with_attr("tirx.is_scheduled", True)
            gvar = self.helpers[name] = importer.block_builder.add_func(func, name)
        builder = importer.block_builder
        flat = builder.emit(relax.op.reshape(x, (size,)))
        rounded = builder.emit(relax.call_tir(gvar, [flat], relax.TensorType((size,), "float32")))
        return builder.emit(relax.op.reshape(rounded, shape))

    def _quantized_layer(self, node: torch.fx.Node) -> SparseLayer | None:
        """The quantized plan layer ``node`` (a linear of the exported program) lowers, if any."""
        if getattr(node.target, "__name__", "") != _LINEAR or node.kwargs:
            return None
        weight = self._stored(node.args[1])
        return self.quantized.get(weight) if weight is not None else None

    def layer(self, node: torch.fx.Node, importer: Any) -> relax.Expr:
        name = getattr(node.target, "__name__", "")
        quantized = self._quantized_layer(node)
        if quantized is not None:
            return self._call_narrow_kernel(node, quantized, importer)
        weight_name, bias_name = self._stored(node.args[1]), self._stored(_arg(node, 2))
        why = self._why_not(node, name, weight_name, bias_name)
        if why is not None:
            log.info("export: node %s stays TVM's own op (%s)", node.name, why)
            return self._default(node, importer)
        assert weight_name is not None
        return self._call_kernel(node, name, weight_name, bias_name, importer)

    def _default(self, node: torch.fx.Node, importer: Any) -> relax.Expr:
        """TVM's own converter for ``node`` (bound to the importer running now)."""
        if not self.defaults:
            self.defaults = importer.create_convert_map()
        return self.defaults[getattr(node.target, "__name__", "")](node)

    def _stored(self, arg: Any) -> str | None:
        """The parameter/buffer name behind a placeholder, or None for anything computed."""
        if not isinstance(arg, torch.fx.Node) or arg.op != "placeholder":
            return None
        return self.params.get(arg.name)

    def _why_not(self, node: torch.fx.Node, name: str, weight: str | None, bias: Any) -> str | None:
        if weight is None:
            return "its weight is computed in the graph"
        if node.kwargs:
            return f"keyword arguments {sorted(node.kwargs)}"
        if _arg(node, 2) is not None and bias is None:
            return "its bias is computed in the graph"
        if self.state[weight].dtype != torch.float32:
            return f"weight dtype {self.state[weight].dtype}"
        if name == _CONV2D and (_arg(node, 6, 1) != 1 or isinstance(_arg(node, 4), str)):
            return "grouped conv or string padding"
        value = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            return "its input is not a float32 tensor"
        if name == _CONV2D and value.dim() != 4:
            return "conv input is not NCHW"
        return None

    def _call_kernel(
        self, node: torch.fx.Node, name: str, weight_name: str, bias_name: str | None, importer: Any
    ) -> relax.Expr:
        weight = self.state[weight_name].detach()
        out = int(weight.shape[0])
        layer = self.pruned.get(weight_name)
        block = layer.block if layer is not None else _dense_block(out)
        mask = layer.sparsity.mask if layer is not None and layer.sparsity is not None else None
        try:
            packed = pack_bsr(weight, block, mask if mask is not None else _full_mask(weight, block))
        except LoweringError as exc:
            raise LoweringError(f"export: node {node.name!r} (weight {weight_name!r}): {exc}") from exc
        x_value = node.args[0].meta["val"]  # type: ignore[union-attr]
        shape = tuple(int(d) for d in x_value.shape)
        activation = self._fold_activation(node)
        spec = KernelSpec(self._geometry(node, name, shape), out, block, packed.nnzb, activation=activation)
        kernel = self._kernel(spec, importer)
        bias = self.state[bias_name].detach() if bias_name is not None else torch.zeros(out)
        builder = importer.block_builder
        x = importer.env[node.args[0]]
        if name == _LINEAR:
            x = builder.emit(relax.op.reshape(x, spec.x_shape))
        args = [x, *(_const(t) for t in (packed.data, packed.indices, packed.indptr, bias))]
        y = builder.emit(relax.call_tir(kernel, args, relax.TensorType(spec.y_shape, "float32")))
        if name == _LINEAR:
            y = builder.emit(relax.op.reshape(y, (*shape[:-1], out)))
        rows, cols = block
        self.layers.append(
            ExportedLayer(
                node.name,
                "linear" if name == _LINEAR else "conv2d",
                weight_name,
                block,
                packed.nnzb,
                (out // rows) * (math.prod(weight.shape[1:]) // cols),
                layer is not None,
                activation,
                kernel.name_hint,
            )
        )
        return y

    def _call_narrow_kernel(self, node: torch.fx.Node, layer: SparseLayer, importer: Any) -> relax.Expr:
        """An int8/bf16 kernel (block-sparse where a template takes the blocks, else dense)."""
        record = layer.quantized
        assert record is not None
        block = narrow_options(layer).sparse_block
        weight = self.state[layer.weight].detach()
        packed = pack_narrow(layer, weight, block)
        shape = tuple(int(d) for d in node.args[0].meta["val"].shape)  # type: ignore[union-attr]
        activation = self._fold_activation(node)
        spec = dataclasses.replace(narrow_spec(layer, shape, block, packed.nnzb), activation=activation)
        kernel = self._kernel(spec, importer)
        bias_name = self._stored(_arg(node, 2))
        out = layer.out_features
        bias = self.state[bias_name].detach() if bias_name is not None else torch.zeros(out)
        builder = importer.block_builder
        x = builder.emit(relax.op.reshape(importer.env[node.args[0]], spec.x_shape))
        args = [x, *(_const(t) for t in (*packed.arrays, bias))]
        y = builder.emit(relax.call_tir(kernel, args, relax.TensorType(spec.y_shape, "float32")))
        y = builder.emit(relax.op.reshape(y, (*shape[:-1], out)))
        rows, cols = spec.block
        self.layers.append(
            ExportedLayer(
                node.name,
                "linear",
                layer.weight,
                spec.block,
                packed.nnzb,
                (out // rows) * (shape[-1] // cols),
                block is not None,
                activation,
                kernel.name_hint,
                record.format,
            )
        )
        return y

    def _fold_activation(self, node: torch.fx.Node) -> Activation | None:
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_function":
            return None
        user = users[0]
        name = getattr(user.target, "__name__", "")
        approximate = user.kwargs.get("approximate", _arg(user, 1, "none"))
        kind: Activation | None = (
            "relu"
            if name == "relu.default"
            else "gelu"
            if name == "gelu.default" and approximate == "none"
            else None
        )
        if kind is not None:
            self.folded.add(user.name)
        return kind

    @staticmethod
    def _geometry(node: torch.fx.Node, name: str, shape: tuple[int, ...]) -> Conv2dGeometry:
        if name == _LINEAR:
            return Conv2dGeometry.dense(math.prod(shape[:-1]), shape[-1])
        weight = node.args[1].meta["val"]  # type: ignore[union-attr]
        n, cin, h, w = shape
        return Conv2dGeometry(
            n,
            cin,
            h,
            w,
            (int(weight.shape[2]), int(weight.shape[3])),
            conv_pair(_arg(node, 3), 1),
            conv_pair(_arg(node, 4), 0),
            conv_pair(_arg(node, 5), 1),
        )

    def _kernel(self, spec: KernelSpec, importer: Any) -> tvm.ir.GlobalVar:
        found = self.kernels.get(spec)
        if found is not None:
            return found
        name = f"tilefx_bsr_{len(self.kernels)}"
        func = cpu_kernel(spec, self.target).with_attr("global_symbol", name)
        func = func.with_attr("op_pattern", _OPAQUE).with_attr("tirx.is_scheduled", True)
        gvar = importer.block_builder.add_func(func, name)
        self.kernels[spec] = gvar
        return gvar


def _fake_quant_expr(builder: Any, x: relax.Expr, node: torch.fx.Node) -> relax.Expr:
    """``passes.quant_ops``' fake quantization of ``x`` as Relax ops (for a node no kernel absorbs)."""
    name = getattr(node.target, "__name__", "")
    op, f32 = relax.op, "float32"

    def const(value: float) -> relax.Expr:
        return relax.const(value, f32)

    if name == "fake_quant_tensor.default":
        scale, zero = float(node.args[1]), float(node.args[2])  # type: ignore[arg-type]
        codes = op.clip(
            op.add(op.round(op.multiply(x, op.divide(const(1.0), const(scale)))), const(zero)), 0, 255
        )
        return builder.emit(op.multiply(const(scale), op.subtract(codes, const(zero))))
    low = op.minimum(op.min(x, axis=[-1], keepdims=True), const(0.0))
    high = op.maximum(op.max(x, axis=[-1], keepdims=True), const(0.0))
    spread = builder.emit(op.subtract(high, low))
    scale = builder.emit(
        op.where(op.greater(spread, const(0.0)), op.divide(spread, const(255.0)), const(1.0))
    )
    inverse = builder.emit(op.divide(const(1.0), scale))
    zero = builder.emit(op.clip(op.round(op.multiply(op.negative(low), inverse)), 0, 255))
    codes = op.clip(op.add(op.round(op.multiply(x, inverse)), zero), 0, 255)
    return builder.emit(op.multiply(scale, op.subtract(codes, zero)))


def _dense_block(out: int) -> tuple[int, int]:
    """The block a dense layer is packed with: the tallest of 16, 8, 4, 2, 1 rows dividing it."""
    return (next(r for r in (16, 8, 4, 2, 1) if out % r == 0), 1)


def _full_mask(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = block
    return torch.ones(weight.shape[0] // rows, math.prod(weight.shape[1:]) // cols, dtype=torch.bool)


def _const(tensor: torch.Tensor) -> relax.Constant:
    array = np.ascontiguousarray(tensor.detach().cpu().numpy())
    return relax.const(array, str(array.dtype))


def _arg(node: torch.fx.Node, index: int, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else default
