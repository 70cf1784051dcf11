"""Typed sparse metadata: the contract between the passes and lowering.

Passes leave the graph a plain torch model whose weights already hold their zeros; these records
say *which structure* those zeros have, so lowering can pick a kernel without re-deriving it.
They are attached per parameter (by its fully qualified name) to ``gm.meta[METADATA_KEY]``.

Every 2-D statement is about a weight's *matrix view* ``weight.reshape(out, -1)``: ``[out, in]``
for a linear and ``[out, in/groups · kh · kw]`` for a conv (im2col order), so a conv block that
spans a whole kernel is ``(b_out, b_in · kh · kw)``.

Records are always about the parameter *as stored*, never about how an op reads it. A linear
written as ``addmm`` / ``mm`` / ``matmul`` with a weight stored ``[in, out]`` (transformers'
``Conv1D`` in GPT-2: ``addmm(bias, x, W)``) therefore has its blocks stated on ``[in, out]``
with the block turned: 16-output-row blocks are ``BlockSparsity((1, 16), mask)``. Masking,
reindexing and verification then need no notion of orientation. Lowering reads the orientation
from the graph (``lowering.plan``): it plans such a layer as a linear on ``weight.T`` with the
record transposed, ``BlockSparsity((16, 1), mask.T)`` (:meth:`BlockSparsity.transposed`), so the
packer and kernel see the ``[out, in]`` view they always see. A weight read through a transpose
(``x @ W.T``) is stored ``[out, in]`` and needs nothing of this.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import torch
import torch.fx

from tilefx.errors import VerificationError

from .graph_utils import attr_tensor

__all__ = [
    "METADATA_KEY",
    "Annotation",
    "BlockSparsity",
    "ChannelSelection",
    "ElementMask",
    "Metadata",
    "NMSparsity",
    "Permutation",
    "QuantizationCost",
    "Quantized",
    "apply_masks",
    "get_metadata",
    "matrix_view",
    "set_metadata",
]

METADATA_KEY = "tilefx"


def matrix_view(weight: torch.Tensor) -> torch.Tensor:
    """The 2-D ``[out, rest]`` view every sparsity record is stated in."""
    return weight.reshape(weight.shape[0], -1)


@dataclass(frozen=True, eq=False)
class ElementMask:
    """Unstructured sparsity: ``mask`` has the weight's shape, True where a weight is kept."""

    mask: torch.Tensor

    def element_mask(self, shape: torch.Size) -> torch.Tensor:
        _check(
            tuple(self.mask.shape) == tuple(shape), f"mask {tuple(self.mask.shape)} vs weight {tuple(shape)}"
        )
        return self.mask.bool()

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.mask.float().mean())


@dataclass(frozen=True, eq=False)
class NMSparsity:
    """N:M sparsity along the matrix view's columns: at most ``n`` kept in every ``m`` consecutive."""

    n: int
    m: int
    mask: torch.Tensor  # same shape as the weight

    def element_mask(self, shape: torch.Size) -> torch.Tensor:
        _check(
            tuple(self.mask.shape) == tuple(shape), f"mask {tuple(self.mask.shape)} vs weight {tuple(shape)}"
        )
        groups = matrix_view(self.mask.bool()).reshape(shape[0], -1, self.m)
        _check(bool((groups.sum(-1) <= self.n).all()), f"mask keeps more than {self.n} of {self.m}")
        return self.mask.bool()

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.mask.float().mean())


@dataclass(frozen=True, eq=False)
class BlockSparsity:
    """Block sparsity on the matrix view: ``block = (rows, cols)``; ``mask[i, j]`` True = block kept.

    A kept block may still contain zeros; a dropped block is all zeros in the weight.
    """

    block: tuple[int, int]
    mask: torch.Tensor  # bool [out / rows, rest / cols]

    def element_mask(self, shape: torch.Size) -> torch.Tensor:
        rows, cols = self.block
        out, rest = shape[0], math.prod(shape[1:])
        _check(
            out % rows == 0 and rest % cols == 0,
            f"block {self.block} does not tile matrix view {(out, rest)}",
        )
        _check(
            tuple(self.mask.shape) == (out // rows, rest // cols),
            f"block mask {tuple(self.mask.shape)} vs grid {(out // rows, rest // cols)}",
        )
        full = self.mask.bool().repeat_interleave(rows, 0).repeat_interleave(cols, 1)
        return full.reshape(shape)

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.mask.float().mean())

    def transposed(self) -> BlockSparsity:
        """The same blocks stated on the transposed 2-D view (``[in, out]`` ↔ ``[out, in]``)."""
        return BlockSparsity((self.block[1], self.block[0]), self.mask.t())


@dataclass(frozen=True)
class ChannelSelection:
    """Channels kept along ``dim`` of a parameter that channel pruning physically shrank."""

    dim: int
    kept: tuple[int, ...]
    original: int


@dataclass(frozen=True)
class Permutation:
    """The parameter's ``dim`` was reordered: new index ``i`` holds old index ``order[i]``."""

    dim: int
    order: tuple[int, ...]

    def __post_init__(self) -> None:
        _check(
            sorted(self.order) == list(range(len(self.order))),
            f"order along dim {self.dim} is not a bijection",
        )


@dataclass(frozen=True, eq=False)
class Quantized:
    """The weight and its linear's input run in a narrower number format (``QuantizeLinearsPass``).

    ``format="int8"``: the weight holds ``weight_scales[n] · q`` with int8 codes ``q`` in
    [-127, 127] (``weight_scales`` fp32 ``[out]``, all equal when not ``per_channel``), and the
    linear's input goes through ``tilefx::fake_quant_rows`` (``scheme="dynamic"``: asymmetric
    uint8 per row at run time) or ``tilefx::fake_quant_tensor(x, act_scale, act_zero_point)``
    (``"static"``: one grid from calibration). ``format="bf16"``: the weight holds bf16-rounded
    values and the input goes through ``tilefx::round_bf16``; no scales. ``cost`` is the model
    output's relative error with only this layer quantized, when the accuracy-aware fallback
    measured it. The scheme itself is in ``passes.quant_ops``.
    """

    format: Literal["int8", "bf16"]
    scheme: Literal["dynamic", "static"] = "dynamic"
    weight_scales: torch.Tensor | None = None
    per_channel: bool = True
    act_scale: float | None = None
    act_zero_point: int | None = None
    cost: float | None = None

    def __post_init__(self) -> None:
        if self.format == "int8":
            _check(self.weight_scales is not None, "an int8 record needs its weight scales")
        if self.format == "int8" and self.scheme == "static":
            _check(
                self.act_scale is not None and self.act_zero_point is not None,
                "a static int8 record needs the activation scale and zero point",
            )


@dataclass(frozen=True)
class QuantizationCost:
    """One layer as the accuracy-aware fallback saw it: its cost, and whether it stayed quantized."""

    param: str
    cost: float
    quantized: bool


Annotation = ElementMask | NMSparsity | BlockSparsity | ChannelSelection | Permutation | Quantized
A = TypeVar("A", ElementMask, NMSparsity, BlockSparsity, ChannelSelection, Permutation, Quantized)


@dataclass(frozen=True)
class Metadata:
    """All annotations of one graph module, keyed by parameter name, plus the recipe that made them."""

    params: Mapping[str, tuple[Annotation, ...]] = field(default_factory=dict)
    recipe: Any = None
    #: Mean loss per training step of the recovery pass, when it ran (the report plots it).
    recovery_losses: tuple[float, ...] = ()
    #: How ``tilefx.optimize`` verified each modifying pass (``PassCheck``s; the report lists them).
    verification: tuple[Any, ...] = ()
    #: The accuracy-aware quantization fallback's per-layer costs, when it ran (costliest first).
    quantization: tuple[QuantizationCost, ...] = ()

    def of(self, name: str, kind: type[A]) -> list[A]:
        return [a for a in self.params.get(name, ()) if isinstance(a, kind)]

    def with_annotation(self, name: str, annotation: Annotation) -> Metadata:
        """A copy with ``annotation`` added; a sparsity record replaces the earlier one of its kind."""
        kept = tuple(a for a in self.params.get(name, ()) if not _replaces(annotation, a))
        return replace(self, params={**self.params, name: (*kept, annotation)})

    def reindexed(self, name: str, dim: int, index: torch.Tensor, shape: torch.Size) -> Metadata:
        """A copy where ``name``'s sparsity record follows ``weight.index_select(dim, index)``.

        Used when a pass permutes or slices a weight (``shape`` is the weight's shape before).
        A reindexed block pattern is in general no longer blocks, so it becomes an ElementMask;
        int8 scales follow the output channels (dim 0).
        """
        updated = self
        for record in self.params.get(name, ()):
            if isinstance(record, (ElementMask, NMSparsity, BlockSparsity)):
                mask = record.element_mask(shape).index_select(dim, index)
                updated = updated.with_annotation(name, ElementMask(mask))
            if isinstance(record, Quantized) and record.weight_scales is not None and dim == 0:
                scales = record.weight_scales.index_select(0, index.to(record.weight_scales.device))
                updated = updated.with_annotation(name, replace(record, weight_scales=scales))
        return updated


def _replaces(new: Annotation, old: Annotation) -> bool:
    sparsity = (ElementMask, NMSparsity, BlockSparsity)
    if isinstance(new, Quantized):
        return isinstance(old, Quantized)
    return isinstance(new, sparsity) and isinstance(old, sparsity)


def get_metadata(gm: torch.fx.GraphModule) -> Metadata:
    found = gm.meta.get(METADATA_KEY)
    return found if isinstance(found, Metadata) else Metadata()


def set_metadata(gm: torch.fx.GraphModule, metadata: Metadata) -> None:
    gm.meta[METADATA_KEY] = metadata


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise VerificationError(f"malformed sparse metadata: {message}")


def apply_masks(target: torch.fx.GraphModule, source: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Zero ``target``'s parameters wherever ``source``'s metadata records pruned weights."""
    sparsity = (ElementMask, NMSparsity, BlockSparsity)
    with torch.no_grad():
        for name, annotations in get_metadata(source).params.items():
            for annotation in annotations:
                if isinstance(annotation, sparsity):
                    weight = attr_tensor(target, name)
                    weight.mul_(annotation.element_mask(weight.shape).to(weight.dtype))
    return target
