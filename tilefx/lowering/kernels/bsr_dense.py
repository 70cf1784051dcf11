"""Block-sparse dense ``Y = act(X·Wᵀ + b)`` on CPU, vector lanes along the block's rows.

W is packed as BSR (see ``tilefx.runtime.packing``) with every block stored transposed,
``data[nnzb, c, r]``, so the ``r`` output features of one block column are one contiguous vector
load. Each parallel task owns one block row and a tile of ``row_tile`` rows of X and keeps the
``row_tile × row_chunk`` accumulators in registers for the whole (ragged) walk over that block
row's stored blocks: a W vector is loaded once per tile, and X is read as broadcast scalars.

X is first packed into per-tile panels ``XP[tile, k, row]`` (zero padded to whole tiles) so the
``row_tile`` broadcasts of one block column come from one cache line. Tasks are ordered so that
one X panel stays in cache while a *group* of block rows streams past it (part, group, X tile,
block row within the group): with the block row outermost, every task re-read its panel from L2
with random column gathers, which cost about 1.5× at 90% sparsity on BERT FFN shapes (AVX2,
measured); the group bounds the W bytes swept per panel so they stay in L2. The X tiles are
split into ``parts`` (one per thread) outermost: the parallel loop hands each thread one
contiguous range of tasks, and every X tile does the same work whatever the sparsity pattern,
so the threads stay balanced even when reordering has sorted block rows by density.

The ragged ``indptr`` loop is why these kernels are written as scheduled TensorIR templates
rather than scheduled with ``s_tir.Schedule``: its primitives need affine loop nests, and a loop
whose bounds are loaded from memory is not one. Which template and tile sizes to use for a
target is decided in ``lowering/schedules``.

Good for blocks with at least one full vector of rows (r ≥ 8 on AVX2); ``bsr_token_panels``
has the template that vectorises along X's rows instead, for shorter blocks (``bsr_tokens`` for
convs).
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .epilogue import activation
from .spec import KernelSpec

__all__ = ["row_lanes_func"]


@T.macro
def pack_x_tiles(X, XP, m_rows, k_cols, m_tiles, tile):  # type: ignore[no-untyped-def]
    """``XP[io, k, ii] = X[io·tile + ii, k]`` (0 past ``m_rows``): each X tile is one contiguous panel.

    A task walks its block row's columns in increasing order, so its X reads move forward
    through one ``k × tile`` panel (K·tile·4 bytes) instead of jumping between rows of a
    ``[K, M]`` transpose; that kept large-K layers (BERT FFN2, K = 3072) out of L3 latency.
    Only the last tile can be ragged: the full ones copy without a per-element bounds select,
    which made the pack 1.5–2× faster (measured, tile 6).
    """
    for io in T.parallel(m_tiles):
        if io * tile + tile <= m_rows:
            for kk in range(k_cols):
                for ii in T.unroll(tile):
                    XP[io, kk, ii] = X[io * tile + ii, kk]
        else:
            for kk in range(k_cols):
                for ii in T.unroll(tile):
                    XP[io, kk, ii] = T.if_then_else(
                        io * tile + ii < m_rows, X[io * tile + ii, kk], T.float32(0)
                    )


def row_lanes_func(
    spec: KernelSpec, row_tile: int, row_chunk: int, group: int = 1, parts: int = 1
) -> tvm.tirx.PrimFunc:
    """Dense-layer kernel with lanes over ``row_chunk`` of the block's ``r`` rows.

    ``group`` block rows are swept per X tile; the X tiles are split into ``parts`` ranges.
    Requires: ``spec.geometry.is_dense``; ``row_chunk`` divides ``r``; ``group`` divides N/r;
    ``parts`` divides the number of X tiles, ceil(M / row_tile).
    Buffers: X[M, K], W_data[nnzb, c, r], W_indices[nnzb], W_indptr[N/r + 1], bias[N], Y[M, N].
    """
    g = spec.geometry
    tiles = -(-g.m // row_tile)
    if not g.is_dense or spec.block[0] % row_chunk or (spec.n // spec.block[0]) % group or tiles % parts:
        raise ValueError(
            f"row_lanes_func needs a dense geometry, row_chunk | r, group | N/r and parts | X tiles, got {spec}"
        )
    if spec.x_transposed or spec.y_transposed:
        raise ValueError(f"row_lanes_func reads X and writes Y row-major, got {spec}")
    R, C = spec.block
    M, K, N = g.m, g.k, spec.n
    MI, RT = row_tile, row_chunk
    MO = -(-M // MI)
    Mp = MO * MI
    NB = N // R
    NNZB = max(spec.nnzb, 1)  # an all-zero weight still needs a well-formed buffer
    padded = Mp != M
    act = activation(spec.activation)
    G, NG, MOP = group, NB // group, MO // parts  # task t = (part, group, tile in part, row in group)

    def _nb(t):  # type: ignore[no-untyped-def]
        return t // (G * MOP) % NG * G + t % G

    def _io(t):  # type: ignore[no-untyped-def]
        return t // (G * MOP * NG) * MOP + t // G % MOP

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        W_data: T.Buffer((NNZB, C, R), "float32"),
        W_indices: T.Buffer((NNZB,), "int32"),
        W_indptr: T.Buffer((NB + 1,), "int32"),
        bias: T.Buffer((N,), "float32"),
        Y: T.Buffer((M, N), "float32"),
    ) -> None:
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        XP = T.alloc_buffer((MO, K, MI), "float32")
        pack_x_tiles(X, XP, M, K, MO, MI)
        for t in T.parallel(NB * MO):
            for rc in range(R // RT):
                acc = T.alloc_buffer((MI, RT), "float32", scope="local")
                for ii in T.unroll(MI):
                    for r in T.vectorized(RT):
                        acc[ii, r] = T.float32(0)
                for e in range(W_indptr[_nb(t)], W_indptr[_nb(t) + 1]):
                    for c in T.unroll(C):
                        for ii in T.unroll(MI):
                            for r in T.vectorized(RT):
                                acc[ii, r] = (
                                    acc[ii, r]
                                    + W_data[e, c, rc * RT + r] * XP[_io(t), W_indices[e] * C + c, ii]
                                )
                for ii in T.unroll(MI):
                    if padded:
                        if _io(t) * MI + ii < M:
                            for r in T.vectorized(RT):
                                Y[_io(t) * MI + ii, _nb(t) * R + rc * RT + r] = act(
                                    acc[ii, r] + bias[_nb(t) * R + rc * RT + r]
                                )
                    else:
                        for r in T.vectorized(RT):
                            Y[_io(t) * MI + ii, _nb(t) * R + rc * RT + r] = act(
                                acc[ii, r] + bias[_nb(t) * R + rc * RT + r]
                            )

    return main
