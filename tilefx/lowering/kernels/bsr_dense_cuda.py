"""Block-sparse dense on CUDA: thread binding and shared-memory staging of X tiles.

One thread block owns one block row of W (blockIdx.x) and a tile of ``rows_per_block`` rows of
X (blockIdx.y); its threads are (X row, block row) pairs, one output each. For every stored
block the threads first stage the ``rows × c`` slice of X that block multiplies into shared
memory (coalesced along c, which is contiguous in X), synchronise, and then each thread reads
its X row from shared memory and its W column straight from global memory (W blocks are stored
transposed, so the threads of one X row read ``r`` consecutive floats: coalesced).

Like the CPU templates, this is a scheduled TensorIR template rather than an ``s_tir.Schedule``
transform of a naive kernel, because the ragged ``indptr`` loop is not an affine loop nest.
How many rows a thread block takes is chosen in ``schedules.cuda``. Convs have no CUDA kernel
yet: ``lowering.build`` keeps them dense torch on CUDA targets.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .epilogue import activation
from .spec import KernelSpec

__all__ = ["thread_rows_func"]


def thread_rows_func(spec: KernelSpec, rows_per_block: int) -> tvm.tirx.PrimFunc:
    """CUDA TensorIR for a linear layer, ``rows_per_block`` rows of X per thread block.

    Requires: ``spec.geometry.is_dense``, X and Y row-major. Buffers as the CPU ``rows``
    template: X[M, K], W_data[nnzb, c, r], W_indices[nnzb], W_indptr[N/r + 1], bias[N], Y[M, N].
    """
    g = spec.geometry
    if not g.is_dense:
        raise ValueError("the CUDA kernel takes the GEMM view: im2col a conv first")
    if spec.x_transposed or spec.y_transposed:
        raise ValueError("the CUDA kernel reads X and writes Y row-major")
    R, C = spec.block
    M, K, N = g.m, g.k, spec.n
    TM = rows_per_block
    MO = -(-M // TM)
    NB = N // R
    NNZB = max(spec.nnzb, 1)
    THREADS = TM * R
    LOADS = -(-(TM * C) // THREADS)  # staging rounds so every slot of the X tile is filled
    act = activation(spec.activation)

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
        for bx in T.thread_binding(NB, thread="blockIdx.x"):
            for by in T.thread_binding(MO, thread="blockIdx.y"):
                for ty in T.thread_binding(TM, thread="threadIdx.y"):
                    for tx in T.thread_binding(R, thread="threadIdx.x"):
                        Xs = T.alloc_buffer((TM, C), "float32", scope="shared")
                        acc = T.alloc_buffer((1,), "float32", scope="local")
                        acc[0] = T.float32(0)
                        for e in range(W_indptr[bx], W_indptr[bx + 1]):
                            for i in range(LOADS):
                                if (i * THREADS + ty * R + tx < TM * C) and (
                                    by * TM + (i * THREADS + ty * R + tx) // C < M
                                ):
                                    Xs[(i * THREADS + ty * R + tx) // C, (i * THREADS + ty * R + tx) % C] = X[
                                        by * TM + (i * THREADS + ty * R + tx) // C,
                                        W_indices[e] * C + (i * THREADS + ty * R + tx) % C,
                                    ]
                            T.tvm_storage_sync("shared")
                            for c in range(C):
                                acc[0] = acc[0] + Xs[ty, c] * W_data[e, c, tx]
                            T.tvm_storage_sync("shared")
                        if by * TM + ty < M:
                            Y[by * TM + ty, bx * R + tx] = act(acc[0] + bias[bx * R + tx])

    return main
