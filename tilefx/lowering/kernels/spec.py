"""What one block-sparse kernel computes, independent of how it is scheduled.

Both kernels are the same GEMM ``Y[m, n] = Σ_k X̂[m, k] · W[n, k]`` with ``W`` in BSR over its
matrix view ``[N, K]``: for a linear ``X̂`` is the input, for a conv it is the im2col of the
input (``k = (ci, dy, dx)``, the order of ``weight.reshape(out, -1)``, so blocks of
``(1, kh·kw)`` are whole kernels). A dense layer is the conv geometry of a 1×1 kernel on a
1×1 image, which is how one template serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...runtime.layout import token_pitch

__all__ = ["Activation", "Conv2dGeometry", "KernelSpec", "NumberFormat", "WeightLayout"]

#: Fused epilogue after bias (``kernels.epilogue``); spec stays TVM-free, so the names live here.
Activation = Literal["relu", "gelu"]
#: What the kernel multiplies in: fp32, int8 (u8 activations × s8 weights, VNNI) or bf16.
NumberFormat = Literal["fp32", "int8", "bf16"]
#: How the weight is packed: BSR blocks, or dense panels (``runtime.packing``; int8 and bf16 only).
WeightLayout = Literal["bsr", "dense"]


@dataclass(frozen=True)
class Conv2dGeometry:
    """Input/kernel geometry of a conv2d (groups = 1). A linear layer is ``dense(m, k)``."""

    batch: int
    in_channels: int
    height: int
    width: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    is_dense: bool = False

    @staticmethod
    def dense(m: int, k: int) -> Conv2dGeometry:
        return Conv2dGeometry(batch=m, in_channels=k, height=1, width=1, is_dense=True)

    @property
    def out_hw(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        oh = (self.height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (self.width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return oh, ow

    @property
    def m(self) -> int:
        """GEMM rows: one per output pixel."""
        oh, ow = self.out_hw
        return self.batch * oh * ow

    @property
    def k(self) -> int:
        """GEMM reduction length: the weight's matrix-view width."""
        return self.in_channels * self.kernel[0] * self.kernel[1]

    @property
    def is_pointwise(self) -> bool:
        """1×1, stride 1, no padding: im2col is a relayout, not a gather."""
        return self.kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.is_dense:
            return (self.batch, self.in_channels)
        return (self.batch, self.in_channels, self.height, self.width)

    def output_shape(self, n: int) -> tuple[int, ...]:
        if self.is_dense:
            return (self.batch, n)
        return (self.batch, n, *self.out_hw)


@dataclass(frozen=True)
class KernelSpec:
    """One kernel instance: geometry, output features, BSR block, stored blocks, epilogue, format.

    For a linear layer, ``x_transposed`` means X arrives as ``Xᵀ [K, P]`` and ``y_transposed``
    that Y is written as ``Yᵀ [N, P]``: the token-major layout the ``panels`` template computes
    in, so two sparse layers in a row (FFN1 → GELU → FFN2) hand over without transposing. The
    pitch ``P = token_pitch(M)`` rounds M up to whole tiles (columns past M are padding the
    kernels may read and write), so any M can be handed over, not only multiples of the tile.
    """

    geometry: Conv2dGeometry
    n: int
    block: tuple[int, int]
    nnzb: int
    activation: Activation | None = None
    x_transposed: bool = False
    y_transposed: bool = False
    number_format: NumberFormat = "fp32"
    #: int8 only: activations on one grid given at run time (static scheme) instead of per row.
    static_activations: bool = False
    #: int8 and bf16: a dense weight in panels (``block`` and ``nnzb`` then describe no blocks).
    weight_layout: WeightLayout = "bsr"

    def __post_init__(self) -> None:
        if (self.x_transposed or self.y_transposed) and not self.geometry.is_dense:
            raise ValueError(f"transposed X/Y layouts are for linear layers only, got {self.geometry}")
        quantized = self.number_format != "fp32"
        if quantized and (not self.geometry.is_dense or self.x_transposed or self.y_transposed):
            raise ValueError(f"{self.number_format} kernels are row-major linear layers, got {self}")
        if self.weight_layout == "dense" and not quantized:
            raise ValueError("fp32 dense layers stay torch (or full-density BSR); dense panels are int8/bf16")
        if self.static_activations and self.number_format != "int8":
            raise ValueError("static activation grids are an int8 scheme")

    @property
    def x_shape(self) -> tuple[int, ...]:
        g = self.geometry
        return (g.k, token_pitch(g.m)) if self.x_transposed else g.input_shape

    @property
    def y_shape(self) -> tuple[int, ...]:
        return (
            (self.n, token_pitch(self.geometry.m))
            if self.y_transposed
            else self.geometry.output_shape(self.n)
        )

    @property
    def num_block_rows(self) -> int:
        return self.n // self.block[0]
