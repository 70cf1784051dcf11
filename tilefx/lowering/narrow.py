"""Lowering a quantized layer (int8 or bf16): its kernel options, packing, spec and target checks.

A layer with a ``Quantized`` record (``lowering.plan``) runs one of the narrow-format kernels of
``schedules.cpu.narrow_kernel``. Which ones it may run:

* its block sparsity, if any, in the template blocks that compute the same pattern exactly
  (``narrow_block``: ``(16, 4)``, ``(r, 4)``, ``(r, 2)`` or a multiple): the block-sparse kernel;
* always the dense kernel of its format (zeros computed), which is what a block-sparse kernel
  must beat to be kept (``lowering.fallback``; torch's fake-quant graph is a slow simulation, not
  a contender) and what runs when the block fits no template;
* none, when the shape fits no template (``narrow_unsupported``): the layer stays the torch
  fake-quant simulation, with a coverage warning.

The codes are recomputed from the record's scales (``passes.quant_ops.weight_codes``) and must
reproduce the graph's weight exactly: a weight edited after ``optimize`` is a ``LoweringError``,
not a silently different kernel. TVM-free, like the plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from tilefx.errors import LoweringError

from ..passes import quant_ops
from ..runtime.packing import NarrowWeight, pack_bf16_bsr, pack_bf16_dense, pack_int8_bsr, pack_int8_dense
from .kernels.spec import Conv2dGeometry, KernelSpec
from .plan import SparseLayer
from .schedules.cpu import narrow_block, narrow_unsupported

__all__ = [
    "NarrowOptions",
    "REQUIRED_FEATURE",
    "check_narrow_target",
    "narrow_options",
    "narrow_spec",
    "pack_narrow",
]

#: The LLVM CPU feature each narrow format's kernels need.
REQUIRED_FEATURE = {"int8": "avx512vnni", "bf16": "avx512bf16"}


@dataclass(frozen=True)
class NarrowOptions:
    """The kernels one quantized layer may run: ``sparse_block`` (None: no block-sparse kernel),
    whether a dense one exists, and why an option is missing (for the log and the coverage warning)."""

    sparse_block: tuple[int, int] | None
    dense: bool
    why_dense: str = ""
    why_torch: str = ""


def narrow_spec(
    layer: SparseLayer, input_shape: tuple[int, ...], block: tuple[int, int] | None, nnzb: int
) -> KernelSpec:
    """The kernel spec of quantized ``layer`` for one input shape; ``block`` None: the dense kernel."""
    record = layer.quantized
    assert record is not None
    m, k = math.prod(input_shape[:-1]), input_shape[-1]
    width = 4 if record.format == "int8" else 2
    return KernelSpec(
        Conv2dGeometry.dense(m, k),
        layer.out_features,
        block or (16, width),
        nnzb if block is not None else (layer.out_features // 16) * (k // width),
        activation=layer.activation,
        number_format=record.format,
        static_activations=record.format == "int8" and record.scheme == "static",
        weight_layout="bsr" if block is not None else "dense",
    )


def narrow_options(layer: SparseLayer) -> NarrowOptions:
    """Which kernels ``layer`` may run (module docstring)."""
    record = layer.quantized
    assert record is not None
    dense_problem = narrow_unsupported(narrow_spec(layer, layer.input_shape, None, 0))
    if dense_problem is not None:
        return NarrowOptions(None, False, why_torch=dense_problem)
    if layer.sparsity is None:
        return NarrowOptions(None, True)
    block = narrow_block(record.format, layer.sparsity.block)
    if block is None:
        return NarrowOptions(
            None, True, why_dense=f"block {layer.sparsity.block} fits no {record.format} template"
        )
    problem = narrow_unsupported(narrow_spec(layer, layer.input_shape, block, 1))
    if problem is not None:
        return NarrowOptions(None, True, why_dense=problem)
    return NarrowOptions(block, True)


def pack_narrow(layer: SparseLayer, weight: torch.Tensor, block: tuple[int, int] | None) -> NarrowWeight:
    """``weight`` ([out, in], on its record's grid) packed for the sparse kernel of ``block``, or dense."""
    record = layer.quantized
    assert record is not None
    where = f"node {layer.node!r} (weight {layer.weight!r})"
    weight = weight.detach().float().cpu()
    mask = _template_mask(layer, block) if block is not None else None
    try:
        if record.format == "bf16":
            if not torch.equal(quant_ops.round_bf16_ref(weight), weight):
                raise LoweringError("the weight is not bf16-rounded as its Quantized record says")
            return pack_bf16_dense(weight) if mask is None else pack_bf16_bsr(weight, block or (1, 2), mask)
        assert record.weight_scales is not None
        scales = record.weight_scales.detach().float().cpu()
        codes = quant_ops.weight_codes(weight, scales)
        if not torch.equal(codes.float() * scales[:, None], weight):
            raise LoweringError("the weight is not on the int8 grid of its Quantized record's scales")
        grid = (float(record.act_scale), int(record.act_zero_point)) if record.scheme == "static" else None  # type: ignore[arg-type]
        return (
            pack_int8_dense(codes, scales, grid)
            if mask is None
            else pack_int8_bsr(codes, scales, block or (16, 4), mask, grid)
        )
    except LoweringError as exc:
        raise LoweringError(f"{where}: {exc}") from exc


def _template_mask(layer: SparseLayer, block: tuple[int, int]) -> torch.Tensor:
    """The layer's block mask refined to the template's ``block`` (which divides the layer's)."""
    assert layer.sparsity is not None
    (rows, cols), (r, c) = layer.sparsity.block, block
    return layer.sparsity.mask.bool().cpu().repeat_interleave(rows // r, 0).repeat_interleave(cols // c, 1)


def check_narrow_target(
    layers: Iterable[SparseLayer], is_cuda: bool, features: Callable[[], frozenset[str]]
) -> None:
    """Raise ``LoweringError`` before anything compiles when quantized layers cannot run on the target:
    a CUDA target (the kernels are CPU-only for now), or a CPU without the format's feature."""
    quantized = [layer for layer in layers if layer.quantized is not None]
    if not quantized:
        return
    first = quantized[0]
    if is_cuda:
        raise LoweringError(
            f"node {first.node!r} is {first.quantized.format} (Recipe.quantize): int8 and bf16 kernels "  # type: ignore[union-attr]
            "are CPU-only for now; compile for target='llvm', or optimize without quantize for CUDA"
        )
    have = features()
    for layer in quantized:
        needed = REQUIRED_FEATURE[layer.quantized.format]  # type: ignore[union-attr]
        if needed not in have:
            raise LoweringError(
                f"node {layer.node!r} is {layer.quantized.format} (Recipe.quantize), whose kernels need "  # type: ignore[union-attr]
                f"the CPU feature {needed!r}, which the target lacks; compile on (or for) a CPU with it, "
                "or optimize without quantize"
            )
