"""r×2-block BSR bf16 linear for AVX512-BF16, lanes along tokens (``bf16_common``).

X is transposed to token-major k pairs ``XT[K/2, Mp, 2]`` fp32 (each pair moved as one 8-byte
word; a zmm pair is 16 tokens × 2 k). A task is one block row × ``vectors`` vectors of 16
tokens; per stored block, ``vectors`` X conversions (shared by the block's r rows) and r W-pair
conversions (shared by the token vectors) feed ``r · vectors`` ``vdpbf16ps``. The token-major
result is transposed to Y[M, N] with the bias and activation. Blocks are stored row-major
fp32 ``[nnzb, r, 2]`` (``runtime.packing``). Prototype (Zen 5, 1 thread, 4×2 blocks): 1.1–1.4×
tilefx's fp32 BSR kernel at the same block.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .bf16_common import cvt_bf16, dot_bf16
from .epilogue import activation
from .spec import KernelSpec

__all__ = ["bf16_tokens_func"]

_TT = 16


def bf16_tokens_func(spec: KernelSpec, vectors: int = 4) -> tvm.tirx.PrimFunc:
    """The r×2 BSR bf16 kernel for ``spec`` (``r · vectors`` ≤ 24 accumulators).

    Buffers: X[M, K] f32, W_data[nnzb, r, 2] f32, W_indices[nnzb] i32 (block column = k / 2),
    W_indptr[N/r + 1] i32, bias[N], Y[M, N] f32. Requires K % 32 == 0 and N % r == 0.
    """
    g = spec.geometry
    M, K, N = g.m, g.k, spec.n
    R = spec.block[0]
    if spec.number_format != "bf16" or spec.weight_layout != "bsr" or spec.block != (R, 2):
        raise ValueError(f"bf16_tokens_func computes r x 2-block bf16 layers, got {spec}")
    if K % (2 * _TT) or N % R or R * vectors > 24:
        raise ValueError(f"bf16_tokens_func needs K % 32 == 0, N % r == 0, r·vectors ≤ 24, got {spec}")
    TILE = 16 * vectors
    MO = -(-M // TILE)
    Mp = MO * TILE
    K2, NB = K // 2, N // R
    NNZB = max(spec.nnzb, 1)
    tiled = M % _TT == 0 and N % _TT == 0
    act = activation(spec.activation)

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        W_data: T.Buffer((NNZB, R, 2), "float32"),
        W_indices: T.Buffer((NNZB,), "int32"),
        W_indptr: T.Buffer((NB + 1,), "int32"),
        bias: T.Buffer((N,), "float32"),
        Y: T.Buffer((M, N), "float32"),
    ) -> None:
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        XT = T.alloc_buffer((K2, Mp, 2), "float32")
        YT = T.alloc_buffer((N, Mp), "float32")
        Xd = T.decl_buffer((M, K2), "float64", data=X.data)  # a k pair moved as one 8-byte word
        XTd = T.decl_buffer((K2, Mp), "float64", data=XT.data)
        XTf = T.decl_buffer((K2, Mp * 2), "float32", data=XT.data)
        Wd = T.decl_buffer((NNZB, R), "float64", data=W_data.data)
        for t in T.parallel((K2 // _TT) * (Mp // _TT)):
            for qq in T.unroll(_TT):
                for mm in T.vectorized(_TT):
                    XTd[t // (Mp // _TT) * _TT + qq, t % (Mp // _TT) * _TT + mm] = T.if_then_else(
                        t % (Mp // _TT) * _TT + mm < M,
                        Xd[T.min(t % (Mp // _TT) * _TT + mm, M - 1), t // (Mp // _TT) * _TT + qq],
                        T.float64(0),
                    )
        for t in T.parallel(MO * NB):  # t = (token tile, block row), block row inner
            acc = T.alloc_buffer((R, TILE), "float32", scope="local")
            for rr in T.unroll(R):
                for j in T.vectorized(TILE):
                    acc[rr, j] = T.float32(0)
            for e in range(W_indptr[t % NB], W_indptr[t % NB + 1]):
                for v in T.unroll(vectors):
                    for rr in T.unroll(R):
                        acc[rr, T.ramp(v * 16, 1, 16)] = dot_bf16(
                            acc[rr, T.ramp(v * 16, 1, 16)],
                            cvt_bf16(  # 16 tokens × the block's k pair
                                XTf[W_indices[e], T.ramp((t // NB * TILE + v * 16) * 2, 1, 16)],
                                XTf[W_indices[e], T.ramp((t // NB * TILE + v * 16) * 2 + 16, 1, 16)],
                            ),
                            cvt_bf16(  # the row's 2 weights in every dword
                                T.reinterpret("float32x16", T.broadcast(Wd[e, rr], 8)),
                                T.reinterpret("float32x16", T.broadcast(Wd[e, rr], 8)),
                            ),
                        )
            for rr in T.unroll(R):
                for j in T.vectorized(TILE):
                    YT[t % NB * R + rr, t // NB * TILE + j] = act(acc[rr, j] + bias[t % NB * R + rr])
        if tiled:
            for t in T.parallel((M // _TT) * (N // _TT)):
                for mm in T.unroll(_TT):
                    for nn in T.vectorized(_TT):
                        Y[t // (N // _TT) * _TT + mm, t % (N // _TT) * _TT + nn] = YT[
                            t % (N // _TT) * _TT + nn, t // (N // _TT) * _TT + mm
                        ]
        else:
            for mm in T.parallel(M):
                for nn in range(N):
                    Y[mm, nn] = YT[nn, mm]

    return main
