"""Dense bf16 linear for AVX512-BF16: X and W rounded to bf16 in registers, fp32 accumulation.

W is packed fp32 ``[N/16, K/2, 32]`` (``runtime.packing``): per 16 outputs and k pair, the 32
values one converted zmm holds. A task is ``row_tile`` rows × ``vectors`` vectors of 16 outputs.
Per 32 k and row, X is converted once (``vcvtne2ps2bf16`` of 32 floats) and each of its 16 pairs
broadcast by a shuffle (LLVM: ``vshufps``/``vbroadcastss``); per k pair ``vectors`` W conversions
and ``row_tile`` shuffles feed ``row_tile · vectors`` ``vdpbf16ps`` (``bf16_common`` says why the
conversions sit in the loop). Prototype (Zen 5, 1 thread): 57–70% of the ``vdpbf16ps`` peak,
1.1–1.5× oneDNN fp32 and about half the speed of the int8 kernel; fp32 quality.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .bf16_common import bf16_pair, cvt_bf16, dot_bf16
from .epilogue import activation
from .spec import KernelSpec

__all__ = ["bf16_dense_func"]


def bf16_dense_func(spec: KernelSpec, row_tile: int = 6, vectors: int = 3) -> tvm.tirx.PrimFunc:
    """The dense bf16 kernel for ``spec``. Buffers: X[M, K] f32, W[N/16, K/2, 32] f32, bias[N],
    Y[M, N]. Requires K % 32 == 0 and N % (16 · vectors) == 0; rows past M in the last tile
    read row M − 1 and are not stored."""
    g = spec.geometry
    M, K, N = g.m, g.k, spec.n
    if spec.number_format != "bf16" or spec.weight_layout != "dense":
        raise ValueError(f"bf16_dense_func computes dense bf16 layers, got {spec}")
    if K % 32 or N % (16 * vectors):
        raise ValueError(f"bf16_dense_func needs K % 32 == 0 and N % {16 * vectors} == 0, got K={K} N={N}")
    MI, NV = row_tile, vectors
    MO = -(-M // MI)
    NT = N // (16 * NV)
    act = activation(spec.activation)

    def _row(t, i):  # type: ignore[no-untyped-def]
        return T.min(t % MO * MI + i, M - 1)

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        W: T.Buffer((N // 16, K // 2, 32), "float32"),
        bias: T.Buffer((N,), "float32"),
        Y: T.Buffer((M, N), "float32"),
    ) -> None:
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for t in T.parallel(NT * MO):
            acc = T.alloc_buffer((MI, NV * 16), "float32", scope="local")
            for i in T.unroll(MI):
                for j in T.vectorized(NV * 16):
                    acc[i, j] = T.float32(0)
            for q in range(K // 32):
                for p in T.unroll(16):
                    for i in T.unroll(MI):
                        for v in T.unroll(NV):
                            acc[i, T.ramp(v * 16, 1, 16)] = dot_bf16(
                                acc[i, T.ramp(v * 16, 1, 16)],
                                bf16_pair(
                                    cvt_bf16(
                                        X[_row(t, i), T.ramp(q * 32, 1, 16)],
                                        X[_row(t, i), T.ramp(q * 32 + 16, 1, 16)],
                                    ),
                                    p,
                                ),
                                cvt_bf16(
                                    W[t // MO * NV + v, q * 16 + p, T.ramp(0, 1, 16)],
                                    W[t // MO * NV + v, q * 16 + p, T.ramp(16, 1, 16)],
                                ),
                            )
            for i in T.unroll(MI):
                if t % MO * MI + i < M:
                    for j in T.vectorized(NV * 16):
                        Y[t % MO * MI + i, t // MO * NV * 16 + j] = act(
                            acc[i, j] + bias[t // MO * NV * 16 + j]
                        )

    return main
