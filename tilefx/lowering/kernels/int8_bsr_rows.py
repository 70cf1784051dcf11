"""16×4-block BSR int8 linear for AVX512-VNNI, lanes along the block's 16 outputs (``int8_common``).

Blocks are stored row-major ``data[nnzb, 16, 4]`` int8 (``runtime.packing``): lane r holds
``W[r, 0:4]``, so one block is exactly one 64-byte ``vpdpbusd`` operand. A task owns ``row_tile``
rows of X and one block row; per stored block it loads the block once and broadcasts a 4-byte X
word per row, ``row_tile`` ``vpdpbusd`` in all. Tasks run (X tile, block row) with the block row
inner, so a task's X tile (``row_tile · K`` bytes) stays in L1 while W streams past.

Measured in the prototype (Zen 5): 16 rows per tile beat 8 and 24 by 5–20%; X tile outer was
11–20% faster than block row outer at M = 128 and within ±4% at M = 512; the inner loop ran at
78–82% of VNNI peak (one broadcast load per ``vpdpbusd``), and at 80% sparsity the whole kernel
was 2.4–3.3× torch's dynamic int8 on BERT FFN and MiniLM shapes (1 thread).
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .epilogue import activation
from .int8_common import dequantize, quantize_rows, vnni_dot
from .spec import KernelSpec

__all__ = ["ROWS_BLOCK", "int8_rows_func"]

#: The block this template takes: 16 outputs (one zmm of int32 lanes) × 4 k (one VNNI word).
ROWS_BLOCK = (16, 4)


def int8_rows_func(spec: KernelSpec, row_tile: int = 16) -> tvm.tirx.PrimFunc:
    """The 16×4 BSR int8 kernel for ``spec``.

    Buffers: X[M, K] f32, W_data[nnzb, 16, 4] s8, W_indices[nnzb] i32 (block column = k / 4),
    W_indptr[N/16 + 1] i32, sw[N] f32, cs[N] i32, aq[2] f32, bias[N] f32, Y[M, N] f32.
    Requires: block (16, 4), K % 16 == 0.
    """
    g = spec.geometry
    M, K, N = g.m, g.k, spec.n
    if spec.number_format != "int8" or spec.weight_layout != "bsr" or spec.block != ROWS_BLOCK:
        raise ValueError(f"int8_rows_func computes 16x4-block int8 layers, got {spec}")
    if K % 16 or N % 16:
        raise ValueError(f"int8_rows_func needs K % 16 == 0 and N % 16 == 0, got K={K} N={N}")
    MI = row_tile
    MO = -(-M // MI)
    Mp = MO * MI
    G4, NB = K // 4, N // 16
    NNZB = max(spec.nnzb, 1)
    static = spec.static_activations
    act = activation(spec.activation)

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        W_data: T.Buffer((NNZB, 16, 4), "int8"),
        W_indices: T.Buffer((NNZB,), "int32"),
        W_indptr: T.Buffer((NB + 1,), "int32"),
        sw: T.Buffer((N,), "float32"),
        cs: T.Buffer((N,), "int32"),
        aq: T.Buffer((2,), "float32"),
        bias: T.Buffer((N,), "float32"),
        Y: T.Buffer((M, N), "float32"),
    ) -> None:
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        Xq = T.alloc_buffer((Mp, K), "uint8")
        sx = T.alloc_buffer((Mp,), "float32")
        zx = T.alloc_buffer((Mp,), "int32")
        Xw = T.decl_buffer((Mp, G4), "int32", data=Xq.data)
        Ww = T.decl_buffer((NNZB, 16), "int32", data=W_data.data)
        quantize_rows(X, aq, Xq, sx, zx, M, K, Mp, static)
        for t in T.parallel(NB * MO):  # t = (X tile, block row), block row inner
            acc = T.alloc_buffer((MI, 16), "int32", scope="local")
            for i in T.unroll(MI):
                for j in T.vectorized(16):
                    acc[i, j] = 0
            for e in range(W_indptr[t % NB], W_indptr[t % NB + 1]):
                for i in T.unroll(MI):
                    acc[i, T.ramp(0, 1, 16)] = vnni_dot(
                        acc[i, T.ramp(0, 1, 16)],
                        T.broadcast(Xw[t // NB * MI + i, W_indices[e]], 16),
                        Ww[e, T.ramp(0, 1, 16)],
                    )
            for i in T.unroll(MI):
                if t // NB * MI + i < M:
                    for j in T.vectorized(16):
                        Y[t // NB * MI + i, t % NB * 16 + j] = act(
                            dequantize(
                                acc[i, j],
                                zx[t // NB * MI + i],
                                cs[t % NB * 16 + j],
                                sx[t // NB * MI + i],
                                sw[t % NB * 16 + j],
                                bias[t % NB * 16 + j],
                            )
                        )

    return main
