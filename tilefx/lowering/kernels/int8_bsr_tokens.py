"""r×4-block BSR int8 linear for AVX512-VNNI (r = 1, 2, 4, 8), lanes along tokens (``int8_common``).

After the quantization pre-pass, X's codes are transposed to token-major words ``XT[K/4, Mp]``
(each int32 = 4 consecutive k of one token, so a zmm holds 16 tokens × 4 k) in 16×16 word
tiles. A task is one block row × ``vectors`` vectors of 16 tokens; each stored block costs
``vectors`` X vector loads and ``r · vectors`` ``vpdpbusd`` whose int8 operand is the block's 4
weights of one row, broadcast (LLVM folds it into the instruction as ``{1to16}``). ``chains``
interleaved partial sums over a block row's blocks keep independent ``vpdpbusd`` in flight when
``r · vectors`` is small. Output is token-major ``YT[N, Mp]``, transposed to Y[M, N] with the
epilogue applied by the tasks.

Blocks are stored row-major ``data[nnzb, r, 4]`` int8 (``runtime.packing``). Measured in the
prototype (Zen 5, 1 thread): 4×4's inner loop at 87–92% of VNNI peak, 1×4's at 35% (each
``vpdpbusd`` needs its own X load plus per-block index work); 128-token tiles with one chain beat
16-token tiles with 8 chains by 2× (per-block index and address work amortised over more
vectors); the two transposes cost ~0.07 ms per call, which a token-major hand-over between
sparse linears would remove (not built for int8: it needs a per-token quantizer of Xᵀ).
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .epilogue import activation
from .int8_common import dequantize, quantize_rows, vnni_dot
from .spec import KernelSpec

__all__ = ["TOKEN_ROWS", "int8_tokens_func"]

#: Block heights this template takes (blocks are r × 4).
TOKEN_ROWS = (1, 2, 4, 8)
#: Side of the square tiles of the word and output transposes (16 int32/fp32 = one zmm).
_TT = 16


def int8_tokens_func(spec: KernelSpec, vectors: int = 4, chains: int = 1) -> tvm.tirx.PrimFunc:
    """The r×4 BSR int8 kernel for ``spec`` (``chains · r · vectors`` ≤ 28 accumulators).

    Buffers: X[M, K] f32, W_data[nnzb, r, 4] s8, W_indices[nnzb] i32 (block column = k / 4),
    W_indptr[N/r + 1] i32, sw[N] f32, cs[N] i32, aq[2] f32, bias[N] f32, Y[M, N] f32.
    Requires: block (r, 4) with r in ``TOKEN_ROWS``, K % 64 == 0 (whole 16-word transpose tiles).
    """
    g = spec.geometry
    M, K, N = g.m, g.k, spec.n
    R = spec.block[0]
    if (
        spec.number_format != "int8"
        or spec.weight_layout != "bsr"
        or spec.block != (R, 4)
        or R not in TOKEN_ROWS
    ):
        raise ValueError(f"int8_tokens_func computes r x 4-block int8 layers (r in {TOKEN_ROWS}), got {spec}")
    if K % (4 * _TT) or N % R:
        raise ValueError(f"int8_tokens_func needs K % 64 == 0 and N % {R} == 0, got K={K} N={N}")
    if chains * R * vectors > 28:
        raise ValueError(f"chains {chains} x r {R} x vectors {vectors} exceeds 28 accumulators")
    TILE = 16 * vectors
    MO = -(-M // TILE)
    Mp = MO * TILE
    G4, NB = K // 4, N // R
    NNZB = max(spec.nnzb, 1)
    U = chains
    static = spec.static_activations
    tiled = M % _TT == 0 and N % _TT == 0
    act = activation(spec.activation)

    @T.prim_func
    def main(
        X: T.Buffer((M, K), "float32"),
        W_data: T.Buffer((NNZB, R, 4), "int8"),
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
        XT = T.alloc_buffer((G4, Mp), "int32")
        YT = T.alloc_buffer((N, Mp), "float32")
        Xw = T.decl_buffer((Mp, G4), "int32", data=Xq.data)
        Ww = T.decl_buffer((NNZB, R), "int32", data=W_data.data)
        quantize_rows(X, aq, Xq, sx, zx, M, K, Mp, static)
        # token-major words: XT[q, token] = the 4 codes of k = 4q..4q+3 of that token
        for t in T.parallel((G4 // _TT) * (Mp // _TT)):
            for qq in T.unroll(_TT):
                for mm in T.vectorized(_TT):
                    XT[t // (Mp // _TT) * _TT + qq, t % (Mp // _TT) * _TT + mm] = Xw[
                        t % (Mp // _TT) * _TT + mm, t // (Mp // _TT) * _TT + qq
                    ]
        for t in T.parallel(MO * NB):  # t = (token tile, block row), block row inner
            acc = T.alloc_buffer((U, R, TILE), "int32", scope="local")
            for u in T.unroll(U):
                for rr in T.unroll(R):
                    for j in T.vectorized(TILE):
                        acc[u, rr, j] = 0
            for p in range((W_indptr[t % NB + 1] - W_indptr[t % NB]) // U):
                for u in T.unroll(U):
                    for v in T.unroll(vectors):
                        for rr in T.unroll(R):
                            acc[u, rr, T.ramp(v * 16, 1, 16)] = vnni_dot(
                                acc[u, rr, T.ramp(v * 16, 1, 16)],
                                XT[
                                    W_indices[W_indptr[t % NB] + p * U + u],
                                    T.ramp(t // NB * TILE + v * 16, 1, 16),
                                ],
                                T.broadcast(Ww[W_indptr[t % NB] + p * U + u, rr], 16),
                            )
            for e in range(
                W_indptr[t % NB] + (W_indptr[t % NB + 1] - W_indptr[t % NB]) // U * U,
                W_indptr[t % NB + 1],
            ):
                for v in T.unroll(vectors):
                    for rr in T.unroll(R):
                        acc[0, rr, T.ramp(v * 16, 1, 16)] = vnni_dot(
                            acc[0, rr, T.ramp(v * 16, 1, 16)],
                            XT[W_indices[e], T.ramp(t // NB * TILE + v * 16, 1, 16)],
                            T.broadcast(Ww[e, rr], 16),
                        )
            for u in T.unroll(1, U):
                for rr in T.unroll(R):
                    for j in T.vectorized(TILE):
                        acc[0, rr, j] = acc[0, rr, j] + acc[u, rr, j]
            for rr in T.unroll(R):
                for j in T.vectorized(TILE):
                    YT[t % NB * R + rr, t // NB * TILE + j] = act(
                        dequantize(
                            acc[0, rr, j],
                            zx[t // NB * TILE + j],
                            cs[t % NB * R + rr],
                            sx[t // NB * TILE + j],
                            sw[t % NB * R + rr],
                            bias[t % NB * R + rr],
                        )
                    )
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
