"""The pixel-major block-sparse template for CPU convolutions.

A conv is a GEMM over its im2col: ``Y[pixel, co] = Σ_(ci,dy,dx) X̂[pixel, (ci,dy,dx)] · W[co, ...]``
with W's matrix view in BSR; blocks of ``(1, kh·kw)`` are whole kernels (Synaptic Strength's
kernel-level sparsity), larger blocks span several kernels or output channels. A 1×1 conv is
the same GEMM over channels. (Linear layers vectorise the same way in ``bsr_token_panels``.)

The template first lays X out so that pixels are contiguous, through ``conv_layouts`` (padded
planes read as shifted views at stride 1, an im2col otherwise). Then every parallel task owns
one block row and a tile of ``token_tile`` pixels and keeps ``row_chunk × token_tile``
accumulators in registers over the ragged block walk, loading X̂ rows as vectors and
broadcasting W scalars. That makes the vector width independent of the block's row count, so
it suits any block, and the output comes out channel-major, NCHW's own layout: the fused
bias/activation epilogue moves ``YT`` to Y.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .conv_layouts import im2col, pad_input, pad_planes, pointwise_relayout, shifted_layout, tap_x, tap_y
from .epilogue import activation
from .spec import KernelSpec

__all__ = ["token_lanes_func"]


def token_lanes_func(spec: KernelSpec, token_tile: int, row_chunk: int) -> tvm.tirx.PrimFunc:
    """BSR conv2d kernel with lanes over ``token_tile`` output pixels (GEMM rows).

    Requires: a convolution (``not spec.geometry.is_dense``); ``row_chunk`` divides ``r``.
    Buffers: X (NCHW), W_data[nnzb, c, r], W_indices[nnzb], W_indptr[N/r + 1], bias[N], Y (NCHW).
    Every path reads X through ``src[row start of k + tile offset + lane]``: the im2col path
    stores ``XT[k, pixel]`` (row start ``k·Mp``), stride-1 convs read the padded planes directly
    (``shifted_layout``), which saves writing kh·kw copies of X.
    """
    g = spec.geometry
    if g.is_dense:
        raise ValueError(
            f"token_lanes_func is for convolutions (linear layers run token_panels_func), got {spec}"
        )
    if spec.block[0] % row_chunk:
        raise ValueError(f"row_chunk {row_chunk} must divide the block rows of {spec.block}")
    R, C = spec.block
    N = spec.n
    MV, RT = token_tile, row_chunk
    NB = N // R
    NNZB = max(spec.nnzb, 1)
    K, B = g.k, g.batch
    oh, ow = g.out_hw
    KHW = g.kernel[0] * g.kernel[1]
    shifted = not g.is_pointwise and g.stride == (1, 1)
    if shifted:
        WP, PER_IMAGE, PLANE = shifted_layout(g, MV)
        M = B * PER_IMAGE  # tokens, including the dropped columns
    else:
        M = g.m
        WP, PER_IMAGE, PLANE = ow, oh * ow, 0
    MO = -(-M // MV)
    Mp = MO * MV
    SRC = K // KHW * B * PLANE if shifted else K * Mp  # padded planes, or XT[K, Mp]
    padded_shape = (g.batch, g.in_channels, g.height + 2 * g.padding[0], g.width + 2 * g.padding[1])
    act = activation(spec.activation)

    def _row_start(tap, kk):  # type: ignore[no-untyped-def]
        """Where row ``kk`` of the GEMM's X̂ starts in ``src``.

        Stride-1 convs look it up in ``tap`` (filled once per call): computing it inline, with
        divisions by kh·kw and kw, was 1.3–1.5× slower; the others compute ``kk·Mp``, which
        beat a lookup by 2–13% (BERT FFN and ResNet 3×3 shapes, AVX-512, side by side).
        """
        return tap[kk] if shifted else kk * Mp

    def _tile_offset(t):  # type: ignore[no-untyped-def]
        """Where tile ``t % MO`` starts in ``src``, past its tap offset."""
        if shifted:  # tiles never straddle images: PER_IMAGE // MV of them per image
            return t % MO // (PER_IMAGE // MV) * PLANE + t % MO % (PER_IMAGE // MV) * MV
        return t % MO * MV

    @T.prim_func
    def main(
        X: T.Buffer(spec.x_shape, "float32"),
        W_data: T.Buffer((NNZB, C, R), "float32"),
        W_indices: T.Buffer((NNZB,), "int32"),
        W_indptr: T.Buffer((NB + 1,), "int32"),
        bias: T.Buffer((N,), "float32"),
        Y: T.Buffer(spec.y_shape, "float32"),
    ) -> None:
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        src = T.alloc_buffer((SRC,), "float32")
        tap = T.alloc_buffer((K if shifted else 1,), "int32")
        YT = T.alloc_buffer((N, Mp), "float32")
        XT = T.decl_buffer((K, Mp), "float32", data=src.data)
        flat = T.decl_buffer((SRC,), "float32", data=src.data)
        if shifted:
            pad_planes(X, src, g, WP, PLANE)
            for kk in range(K):
                tap[kk] = kk // KHW * B * PLANE + tap_y(g, 0, kk) * WP + tap_x(g, 0, kk)
        elif g.is_pointwise:
            pointwise_relayout(X, XT, g, M, Mp)
        else:
            Xp = T.alloc_buffer(padded_shape, "float32")
            pad_input(X, Xp, g)
            im2col(Xp, XT, g, oh, ow, M, Mp)
        for t in T.parallel(NB * MO):
            for rc in range(R // RT):
                acc = T.alloc_buffer((RT, MV), "float32", scope="local")
                for r in T.unroll(RT):
                    for m in T.vectorized(MV):
                        acc[r, m] = T.float32(0)
                for e in range(W_indptr[t // MO], W_indptr[t // MO + 1]):
                    for c in T.unroll(C):
                        for r in T.unroll(RT):
                            for m in T.vectorized(MV):
                                acc[r, m] = (
                                    acc[r, m]
                                    + W_data[e, c, rc * RT + r]
                                    * flat[_row_start(tap, W_indices[e] * C + c) + _tile_offset(t) + m]
                                )
                for r in T.unroll(RT):
                    for m in T.vectorized(MV):
                        YT[t // MO * R + rc * RT + r, t % MO * MV + m] = acc[r, m]
        for t in T.parallel(g.batch * N):
            for y in range(oh):
                for x in T.vectorized(ow):
                    Y[t // N, t % N, y, x] = act(YT[t % N, t // N * PER_IMAGE + y * WP + x] + bias[t % N])

    return main
