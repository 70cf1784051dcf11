"""Dense int8 linear for AVX512-VNNI: ``Y = act(dequant(quant(X) · qᵀ) + b)`` (``int8_common``).

W is packed offline in VNNI panels ``[N/16, K/4, 16, 4]`` int8 (``runtime.packing``): one
64-byte vector holds 4 consecutive k of 16 outputs, exactly one ``vpdpbusd`` operand. A task is
``row_tile`` rows × ``vectors`` vectors of 16 outputs; per 4 k it loads ``vectors`` W vectors and
``row_tile`` 4-byte X broadcasts for ``row_tile · vectors`` ``vpdpbusd``. Tasks run (n tile,
m tile) with m inner, so a thread's W panel (K · 16 · vectors bytes) stays in L2 while X tiles
pass. (8, 3) was best or within 4% of the best in the prototype's sweeps of (8, 3), (6, 4),
(12, 2), (4, 6), (8, 2), (16, 1) on three shapes (Zen 5, 1 thread); the whole kernel,
quantization included, ran at 83–90% of the measured VNNI peak on BERT-base shapes.

The int8 layer that stays dense (no block sparsity, or blocks no int8 template takes) runs this
kernel, and it is what an int8 block-sparse kernel must beat to be kept (``lowering.fallback``).
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .epilogue import activation
from .int8_common import dequantize, quantize_rows, vnni_dot
from .spec import KernelSpec

__all__ = ["int8_dense_func"]


def int8_dense_func(spec: KernelSpec, row_tile: int = 8, vectors: int = 3) -> tvm.tirx.PrimFunc:
    """The dense int8 kernel for ``spec`` (``weight_layout="dense"``).

    Buffers: X[M, K] f32, W[N/16, K/4, 16, 4] s8, sw[N] f32, cs[N] i32, aq[2] f32 (static grid:
    scale, zero point; unread when dynamic), bias[N] f32, Y[M, N] f32.
    Requires: K % 16 == 0, N % (16 · vectors) == 0.
    """
    g = spec.geometry
    M, K, N = g.m, g.k, spec.n
    if spec.number_format != "int8" or spec.weight_layout != "dense":
        raise ValueError(f"int8_dense_func computes dense int8 layers, got {spec}")
    if K % 16 or N % (16 * vectors):
        raise ValueError(f"int8_dense_func needs K % 16 == 0 and N % {16 * vectors} == 0, got K={K} N={N}")
    MI, NV = row_tile, vectors
    MO = -(-M // MI)
    Mp = MO * MI
    G4, NT = K // 4, N // (16 * NV)
    static = spec.static_activations
    act = activation(spec.activation)

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        W: T.Buffer((N // 16, G4, 16, 4), "int8"),
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
        Xw = T.decl_buffer((Mp, G4), "int32", data=Xq.data)  # 4 codes of one row as one word
        Ww = T.decl_buffer((N // 16, G4, 16), "int32", data=W.data)
        quantize_rows(X, aq, Xq, sx, zx, M, K, Mp, static)
        for t in T.parallel(NT * MO):
            acc = T.alloc_buffer((MI, NV * 16), "int32", scope="local")
            for i in T.unroll(MI):
                for j in T.vectorized(NV * 16):
                    acc[i, j] = 0
            for q in range(G4):
                for i in T.unroll(MI):
                    for v in T.unroll(NV):
                        acc[i, T.ramp(v * 16, 1, 16)] = vnni_dot(
                            acc[i, T.ramp(v * 16, 1, 16)],
                            T.broadcast(Xw[t % MO * MI + i, q], 16),
                            Ww[t // MO * NV + v, q, T.ramp(0, 1, 16)],
                        )
            for i in T.unroll(MI):
                if t % MO * MI + i < M:
                    for j in T.vectorized(NV * 16):
                        Y[t % MO * MI + i, t // MO * NV * 16 + j] = act(
                            dequantize(
                                acc[i, j],
                                zx[t % MO * MI + i],
                                cs[t // MO * NV * 16 + j],
                                sx[t % MO * MI + i],
                                sw[t // MO * NV * 16 + j],
                                bias[t // MO * NV * 16 + j],
                            )
                        )

    return main
