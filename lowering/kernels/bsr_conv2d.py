"""Block-sparse conv2d (and narrow-block dense) on CPU, vector lanes along X's rows.

A conv is a GEMM over its im2col: ``Y[pixel, co] = Σ_(ci,dy,dx) X̂[pixel, (ci,dy,dx)] · W[co, ...]``
with W's matrix view in BSR; blocks of ``(1, kh·kw)`` are whole kernels (Synaptic Strength's
kernel-level sparsity), larger blocks span several kernels or output channels. A 1×1 conv is
the same GEMM over channels, and a linear layer is a 1×1 conv on a 1×1 image.

The template first lays X out so that pixels are contiguous: stride-1 convs only copy it into
zero-padded planes and read every tap as a shifted view of them (no im2col; 2–5× faster at 90%
than gathering ``XT[k, pixel]`` on ResNet-50's 3×3 convs, measured side by side, since the
im2col wrote kh·kw copies of X); strided convs gather the im2col ``XT[k, pixel]``, linear layers
transpose. Then every parallel task owns one block row and a tile of ``token_tile`` pixels and
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
from .bsr_dense import transpose_x
from .epilogue import activation
from .spec import KernelSpec, token_pitch

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


def _shifted_layout(g, tile: int) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    """``(Wp, tokens per image, plane length)`` of the stride-1 layout without im2col.

    Output pixels are computed on the padded width: token ``y·Wp + x`` of an image reads tap
    ``(dy, dx)`` at ``y·Wp + x + dy·dh·Wp + dx·dw`` of the flattened zero-padded input plane,
    a constant offset per tap, so a vector of tokens is one contiguous load. The ``Wp − ow``
    extra columns per row are computed and dropped by the epilogue; tokens per image are
    rounded up to whole tiles (tiles never straddle images) and the plane is zero-extended so
    the last tile's shifted reads stay inside it.
    """
    wp = g.width + 2 * g.padding[1]
    oh, _ = g.out_hw
    tokens = -(-oh * wp // tile) * tile
    max_offset = (g.kernel[0] - 1) * g.dilation[0] * wp + (g.kernel[1] - 1) * g.dilation[1]
    return wp, tokens, max((g.height + 2 * g.padding[0]) * wp, tokens + max_offset)


@T.macro
def pad_planes(X, Xs, g, wp, plane):  # type: ignore[no-untyped-def]
    """``Xs[(ci·B + b)·plane + (y+ph)·Wp + x+pw] = X[b, ci, y, x]``, zero elsewhere."""
    for t in T.parallel(g.in_channels * g.batch):
        for i in range(plane):
            Xs[t * plane + i] = T.float32(0)
        for y in range(g.height):
            for x in T.vectorized(g.width):
                Xs[t * plane + (y + g.padding[0]) * wp + x + g.padding[1]] = X[
                    t % g.batch, t // g.batch, y, x
                ]


def token_lanes_func(spec: KernelSpec, token_tile: int, row_chunk: int) -> tvm.tirx.PrimFunc:
    """BSR conv2d / dense kernel with lanes over ``token_tile`` output pixels (GEMM rows).

    Requires: ``row_chunk`` divides ``r``; ``token_tile`` divides the pitch P when X or Y is
    transposed. Buffers: X (NCHW, or [M, K] for a linear layer, [K, P] if ``spec.x_transposed``),
    W_data[nnzb, c, r], W_indices[nnzb], W_indptr[N/r + 1], bias[N], Y (NCHW, or [M, N], or
    [N, P] if ``spec.y_transposed``). Every path reads X through ``src[row start of k + tile
    offset + lane]``: the im2col and transpose paths store ``XT[k, token]`` (row start ``k·Mp``),
    stride-1 convs read the padded planes directly (``_shifted_layout``), which saves writing
    kh·kw copies of X; a transposed X is read where it lies. A transposed Y is written by the
    task that computes it, with no ``YT`` and no transpose.
    """
    g = spec.geometry
    if spec.block[0] % row_chunk:
        raise ValueError(f"row_chunk {row_chunk} must divide the block rows of {spec.block}")
    transposed = spec.x_transposed or spec.y_transposed
    if transposed and token_pitch(g.m) % token_tile:
        raise ValueError(
            f"token_tile {token_tile} must divide the pitch {token_pitch(g.m)} of a transposed X or Y"
        )
    R, C = spec.block
    N = spec.n
    MV, RT = token_tile, row_chunk
    NB = N // R
    NNZB = max(spec.nnzb, 1)
    K, B = g.k, g.batch
    oh, ow = g.out_hw
    KHW = g.kernel[0] * g.kernel[1]
    shifted = not g.is_dense and not g.is_pointwise and g.stride == (1, 1)
    if shifted:
        WP, PER_IMAGE, PLANE = _shifted_layout(g, MV)
        M = B * PER_IMAGE  # tokens, including the dropped columns
    else:
        M = g.m
        WP, PER_IMAGE, PLANE = ow, oh * ow, 0
    MO = -(-(token_pitch(M) if transposed else M) // MV)
    Mp = MO * MV  # the pitch itself when X or Y is transposed
    # padded planes, or XT[K, Mp] (a transposed X is used in place: 1 placeholder element)
    SRC = K // KHW * B * PLANE if shifted else 1 if spec.x_transposed else K * Mp
    padded_shape = (g.batch, g.in_channels, g.height + 2 * g.padding[0], g.width + 2 * g.padding[1])
    tiled_transpose = g.is_dense and M % _TILE == 0 and N % _TILE == 0 and not spec.y_transposed
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
        YT = T.alloc_buffer((1, 1) if spec.y_transposed else (N, Mp), "float32")
        XT = T.decl_buffer((K, Mp), "float32", data=X.data if spec.x_transposed else src.data)
        flat = T.decl_buffer((K * Mp,) if spec.x_transposed else (SRC,), "float32", data=XT.data)
        if shifted:
            pad_planes(X, src, g, WP, PLANE)
            for kk in range(K):
                tap[kk] = kk // KHW * B * PLANE + _tap_y(g, 0, kk) * WP + _tap_x(g, 0, kk)
        else:
            if spec.x_transposed:
                pass  # already token-major, in whole tiles of the pitch
            elif g.is_dense:
                transpose_x(X, XT, M, K, Mp)
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
                if spec.y_transposed:
                    for r in T.unroll(RT):
                        for m in T.vectorized(MV):
                            Y[t // MO * R + rc * RT + r, t % MO * MV + m] = act(
                                acc[r, m] + bias[t // MO * R + rc * RT + r]
                            )
                else:
                    for r in T.unroll(RT):
                        for m in T.vectorized(MV):
                            YT[t // MO * R + rc * RT + r, t % MO * MV + m] = acc[r, m]
        if spec.y_transposed:
            pass  # written by the tasks
        elif tiled_transpose:
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
                for y in range(oh):
                    for x in T.vectorized(ow):
                        Y[t // N, t % N, y, x] = act(YT[t % N, t // N * PER_IMAGE + y * WP + x] + bias[t % N])

    return main
