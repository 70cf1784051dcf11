"""Block-sparse conv2d (and narrow-block dense) on CPU, vector lanes along X's rows.

A conv is a GEMM over its im2col: ``Y[pixel, co] = Σ_(ci,dy,dx) X̂[pixel, (ci,dy,dx)] · W[co, ...]``
with W's matrix view in BSR; blocks of ``(1, kh·kw)`` are whole kernels (Synaptic Strength's
kernel-level sparsity), larger blocks span several kernels or output channels. A 1×1 conv is
the same GEMM over channels, and a linear layer is a 1×1 conv on a 1×1 image.

The template first gathers ``XT[k, pixel]`` (im2col, zero padded, transposed so pixels are
contiguous), then every parallel task owns one block row and a tile of ``token_tile`` pixels and
keeps ``row_chunk × token_tile`` accumulators in registers over the ragged block walk, loading
XT rows as vectors and broadcasting W scalars. That makes the vector width independent of the
block's row count, so it suits r = 1, 2, 4 and convs (whose output is channel-major, NCHW, which
is exactly this layout). The result is written channel-major to ``YT`` and moved to NCHW (or,
for a linear layer, transposed back to ``[M, N]``) by the fused bias/ReLU epilogue.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .bsr_dense import TILE as _TILE
from .bsr_dense import activation, transpose_x
from .spec import KernelSpec

__all__ = ["token_lanes_func"]


def _tap_y(g, y, kk):  # type: ignore[no-untyped-def]
    """Row of the zero-padded input that output row ``y`` reads through tap ``kk = (ci, dy, dx)``."""
    return y * g.stride[0] + kk % (g.kernel[0] * g.kernel[1]) // g.kernel[1] * g.dilation[0]


def _tap_x(g, x, kk):  # type: ignore[no-untyped-def]
    """Column of the zero-padded input that output column ``x`` reads through tap ``kk``."""
    return x * g.stride[1] + kk % g.kernel[1] * g.dilation[1]


@T.macro
def pad_input(X, Xp, g):  # type: ignore[no-untyped-def]
    """Copy X into a zero border once, so the im2col below needs no bounds test per tap.

    A per-element ``if_then_else`` in im2col (kh·kw times more elements) kept LLVM from
    vectorising it, and im2col dominated the conv kernel at high sparsity.
    """
    for t in T.parallel(g.batch * g.in_channels):
        for yy, xx in T.grid(g.height + 2 * g.padding[0], g.width + 2 * g.padding[1]):
            Xp[t // g.in_channels, t % g.in_channels, yy, xx] = T.float32(0)
        for y, x in T.grid(g.height, g.width):
            Xp[t // g.in_channels, t % g.in_channels, y + g.padding[0], x + g.padding[1]] = X[
                t // g.in_channels, t % g.in_channels, y, x
            ]


@T.macro
def im2col(Xp, XT, g, oh, ow, m_rows, m_pad):  # type: ignore[no-untyped-def]
    """``XT[(ci,dy,dx), (b,y,x)]`` = the (padded) input pixel that kernel tap sees."""
    for kk in T.parallel(g.k):
        for b, y, x in T.grid(g.batch, oh, ow):
            XT[kk, (b * oh + y) * ow + x] = Xp[
                b, kk // (g.kernel[0] * g.kernel[1]), _tap_y(g, y, kk), _tap_x(g, x, kk)
            ]
        for m in range(m_rows, m_pad):
            XT[kk, m] = T.float32(0)


@T.macro
def pointwise_relayout(X, XT, g, m_rows, m_pad):  # type: ignore[no-untyped-def]
    """im2col of a 1×1/stride-1 conv: a per-image copy of contiguous channel planes."""
    for kk in T.parallel(g.k):
        for b, y, x in T.grid(g.batch, g.height, g.width):
            XT[kk, (b * g.height + y) * g.width + x] = X[b, kk, y, x]
        for m in range(m_rows, m_pad):
            XT[kk, m] = T.float32(0)


def token_lanes_func(spec: KernelSpec, token_tile: int, row_chunk: int) -> tvm.tirx.PrimFunc:
    """BSR conv2d / dense kernel with lanes over ``token_tile`` output pixels (GEMM rows).

    Requires: ``row_chunk`` divides ``r``. Buffers: X (NCHW, or [M, K] for a linear layer),
    W_data[nnzb, c, r], W_indices[nnzb], W_indptr[N/r + 1], bias[N], Y (NCHW, or [M, N]).
    """
    g = spec.geometry
    if spec.block[0] % row_chunk:
        raise ValueError(f"row_chunk {row_chunk} must divide the block rows of {spec.block}")
    R, C = spec.block
    M, N = g.m, spec.n
    MV, RT = token_tile, row_chunk
    MO = -(-M // MV)
    Mp = MO * MV
    NB = N // R
    NNZB = max(spec.nnzb, 1)
    oh, ow = g.out_hw
    HW = oh * ow
    padded_shape = (g.batch, g.in_channels, g.height + 2 * g.padding[0], g.width + 2 * g.padding[1])
    tiled_transpose = g.is_dense and M % _TILE == 0 and N % _TILE == 0
    act = activation(spec.relu)

    @T.prim_func
    def main(
        X: T.Buffer(g.input_shape, "float32"),
        W_data: T.Buffer((NNZB, C, R), "float32"),
        W_indices: T.Buffer((NNZB,), "int32"),
        W_indptr: T.Buffer((NB + 1,), "int32"),
        bias: T.Buffer((N,), "float32"),
        Y: T.Buffer(g.output_shape(N), "float32"),
    ) -> None:
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        XT = T.alloc_buffer((g.k, Mp), "float32")
        YT = T.alloc_buffer((N, Mp), "float32")
        if g.is_dense:
            transpose_x(X, XT, M, g.k, Mp)
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
                                    + W_data[e, c, rc * RT + r] * XT[W_indices[e] * C + c, t % MO * MV + m]
                                )
                for r in T.unroll(RT):
                    for m in T.vectorized(MV):
                        YT[t // MO * R + rc * RT + r, t % MO * MV + m] = acc[r, m]
        if tiled_transpose:
            # Square tiles keep both the strided reads and the contiguous writes in L1.
            for t in T.parallel((M // _TILE) * (N // _TILE)):
                for mm in T.unroll(_TILE):
                    for nn in T.vectorized(_TILE):
                        Y[t // (N // _TILE) * _TILE + mm, t % (N // _TILE) * _TILE + nn] = act(
                            YT[t % (N // _TILE) * _TILE + nn, t // (N // _TILE) * _TILE + mm]
                            + bias[t % (N // _TILE) * _TILE + nn]
                        )
        elif g.is_dense:
            for m in T.parallel(M):
                for n in range(N):
                    Y[m, n] = act(YT[n, m] + bias[n])
        else:
            for t in T.parallel(g.batch * N):
                for y, x in T.grid(oh, ow):
                    Y[t // N, t % N, y, x] = act(YT[t % N, t // N * HW + y * ow + x] + bias[t % N])

    return main
