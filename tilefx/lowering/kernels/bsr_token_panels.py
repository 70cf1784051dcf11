"""Token-lane block-sparse linear layers whose threads own their tokens: no shared transposes.

The ``tokens`` template (``bsr_tokens``) lays X out token-major in one parallel loop, computes in
a second and transposes Y back in a third. On a 2-core Xeon that layout work, not the
multiply-adds, was most of the difference to the ideal at fine blocks: run on Xᵀ and writing Yᵀ,
the same inner loop measured 1.9× dense at 4×1 / 50% and 9.4× at 16×1 / 90% (BERT FFN1), but
0.1–0.2 ms slower with row-major X and Y. Only 20–25 µs of that is the transposes themselves;
the rest is every cache line of Xᵀ and Yᵀ written by one core and read by the other.

So here a layer's tokens are split into ``parts`` (one per thread) and everything about a token
tile stays on the thread that owns it: the part packs its tiles of X into private panels
``XP[part, tile, k, token]`` (one contiguous ``K × token_tile`` panel per tile), walks every
block row for them with ``row_chunk × token_tile`` accumulators in registers, and writes its
rows of Y straight from the accumulators (bias and activation fused), or Yᵀ's columns when
handing over to another sparse layer. Every part does the same work whatever the sparsity
pattern, so the threads stay balanced. This is the input-stationary order of CPU sparse
libraries that vectorise along the spatial dimension (XNNPACK's sparse convolutions, Elsen et al.,
"Fast Sparse ConvNets", CVPR 2020): the activations a thread multiplies stay in its own cache
while the compressed weights stream past.
"""

from __future__ import annotations

import tvm
from tvm.ir.prim.expr import Expr as PrimExpr
from tvm.script import tirx as T

from ...runtime.layout import token_pitch
from .epilogue import activation
from .spec import KernelSpec

__all__ = ["token_panels_func"]

#: Columns of row-major Y a task writes at once: 16 floats, one cache line per token.
_GROUP_COLUMNS = 16
#: Side of the tiles ``store_transposed`` turns in registers.
_SQUARE = 16


def _per_lane(pattern: list[int]) -> list[int]:
    """``pattern`` (indices into one 128-bit lane of a and b, b's from 4) in each of the four lanes."""
    return [lane * 4 + i if i < 4 else 16 + lane * 4 + i - 4 for lane in range(4) for i in pattern]


# Two-vector shuffle masks (indices 16–31 are the second vector's) of the 16 × 16 transpose.
_UNPACK_LO_PS = _per_lane([0, 4, 1, 5])
_UNPACK_HI_PS = _per_lane([2, 6, 3, 7])
_UNPACK_LO_PD = _per_lane([0, 1, 4, 5])
_UNPACK_HI_PD = _per_lane([2, 3, 6, 7])
_LANES_EVEN = [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]  # lanes 0, 2 of a, then of b
_LANES_ODD = [i + 4 for i in _LANES_EVEN]


def _shuffle(a: PrimExpr, b: PrimExpr, mask: list[int]) -> PrimExpr:
    return tvm.tirx.Shuffle([a, b], [tvm.tirx.IntImm("int32", i) for i in mask])


def transposed_row(
    buffer: tvm.tirx.Buffer, prefix: list[PrimExpr], row: PrimExpr, col: PrimExpr, q: PrimExpr
) -> PrimExpr:
    """Lane ``col + q`` of the 16 rows ``buffer[*prefix, row:+16, col:+16]``, as one 16-lane vector.

    The classic 16 × 16 transpose in four stages of two-vector shuffles that x86 has as single
    instructions with immediates (unpack ps, unpack pd, two 128-bit lane shuffles), written as
    one expression per output row and chosen by ``q`` (a constant once ``T.unroll`` unrolls it):
    LLVM merges the 16 expressions' shared stages into 64 shuffles, where reading S by columns
    took 16 scalar loads and inserts per row. No intermediate buffers: local stage buffers let
    TVM's storage rewrite share a stack slot with the accumulators, which then left registers.
    """
    r = [
        tvm.tirx.BufferLoad(buffer, [*prefix, row + n, tvm.tirx.Ramp(col, 1, _SQUARE)])
        for n in range(_SQUARE)
    ]
    t: list[PrimExpr] = []
    for i in range(8):
        t += [
            _shuffle(r[2 * i], r[2 * i + 1], _UNPACK_LO_PS),
            _shuffle(r[2 * i], r[2 * i + 1], _UNPACK_HI_PS),
        ]
    u: list[PrimExpr] = [t[0]] * _SQUARE
    for i in range(4):
        for j in range(2):
            a, b = t[4 * i + j], t[4 * i + j + 2]
            u[4 * i + 2 * j], u[4 * i + 2 * j + 1] = (
                _shuffle(a, b, _UNPACK_LO_PD),
                _shuffle(a, b, _UNPACK_HI_PD),
            )
    v: list[PrimExpr] = [t[0]] * _SQUARE
    for i in (0, 1, 2, 3, 8, 9, 10, 11):
        v[i], v[i + 4] = _shuffle(u[i], u[i + 4], _LANES_EVEN), _shuffle(u[i], u[i + 4], _LANES_ODD)
    w: list[PrimExpr] = [t[0]] * _SQUARE
    for i in range(8):
        w[i], w[i + 8] = _shuffle(v[i], v[i + 8], _LANES_EVEN), _shuffle(v[i], v[i + 8], _LANES_ODD)
    picked = w[_SQUARE - 1]
    for i in reversed(range(_SQUARE - 1)):
        picked = tvm.tirx.Select(q == i, w[i], picked)
    return picked


def token_panels_func(
    spec: KernelSpec, token_tile: int, row_chunk: int, parts: int, row_parts: int = 1
) -> tvm.tirx.PrimFunc:
    """BSR linear layer with lanes over ``token_tile`` tokens, the tiles split into ``parts``.

    ``row_parts`` splits the block rows as well (``parts × row_parts`` tasks, one per thread),
    for batches with fewer tiles than threads; each such task packs its own copy of its panels.
    Requires: a linear layer (``spec.geometry.is_dense``); ``row_chunk`` divides r; ``parts``
    divides the number of tiles and ``row_parts`` the block rows; ``token_tile`` divides the
    pitch when X or Y is transposed.
    Buffers: X ([M, K], or Xᵀ [K, P] if ``spec.x_transposed``), W_data[nnzb, c, r],
    W_indices[nnzb], W_indptr[N/r + 1], bias[N], Y ([M, N], or Yᵀ [N, P] if ``spec.y_transposed``).
    """
    g = spec.geometry
    if not g.is_dense or spec.block[0] % row_chunk:
        raise ValueError(f"token_panels_func needs a linear layer and row_chunk | r, got {spec}")
    transposed = spec.x_transposed or spec.y_transposed
    M, K, N = g.m, g.k, spec.n
    MV, RT = token_tile, row_chunk
    if transposed and token_pitch(M) % MV:
        raise ValueError(f"token_tile {MV} must divide the pitch {token_pitch(M)} of a transposed X or Y")
    MO = -(-(token_pitch(M) if transposed else M) // MV)
    R, C = spec.block
    NB = N // R
    if MO % parts or NB % row_parts:
        raise ValueError(
            f"parts {parts} must divide the {MO} token tiles and row_parts {row_parts} the {NB} block rows of {spec}"
        )
    NBP = NB // row_parts
    GR = _GROUP_COLUMNS // R if R < _GROUP_COLUMNS and NBP % (_GROUP_COLUMNS // R) == 0 else 1
    GC = GR * R  # columns of Y written together
    P = parts * row_parts
    NNZB = max(spec.nnzb, 1)
    MOP = MO // parts
    packs = not spec.x_transposed
    whole = K % _SQUARE == 0 and MV % _SQUARE == 0  # tiles of 16 × 16 (the last may be ragged)
    act = activation(spec.activation)

    # Task p's step tt is (group of GR block rows, tile, block row in the group): a group's W
    # blocks stay in L1 while the part's tiles take turns, its panels in L2.
    def _tile(tt):  # type: ignore[no-untyped-def]
        return tt // GR % MOP

    def _row(p, tt):  # type: ignore[no-untyped-def]
        """The block row of task ``p``'s step ``tt``."""
        return p % row_parts * NBP + tt // (GR * MOP) * GR + tt % GR

    def _tile_start(p, io):  # type: ignore[no-untyped-def]
        """The first token of task ``p``'s tile ``io``."""
        return (p // row_parts * MOP + io) * MV

    def _token(p, tt):  # type: ignore[no-untyped-def]
        """The first token of task ``p``'s step ``tt``."""
        return _tile_start(p, _tile(tt))

    shuffles = GC % _SQUARE == 0 and MV % _SQUARE == 0

    @T.macro
    def store_transposed(S, Y, bias, p, s_row, s_col, y_row, y_col):  # type: ignore[no-untyped-def]
        """``Y[y_row + q, y_col:+16] = act(S[p, s_row:+16, s_col + q] + bias)`` for the 16 q (< M)."""
        for q in T.unroll(_SQUARE):
            if y_row + q < M:
                Y[y_row + q, T.Ramp(y_col, 1, _SQUARE)] = act(
                    transposed_row(S, [p], s_row, s_col, q) + bias[T.Ramp(y_col, 1, _SQUARE)]
                )

    @T.macro
    def write_group(S, Y, bias, p, tt):  # type: ignore[no-untyped-def]
        """Y's rows of step ``tt``'s tile, in the columns of its group, from the group's Yᵀ in S."""
        if shuffles:
            for h, mb in T.grid(GC // _SQUARE, MV // _SQUARE):
                store_transposed(
                    S,
                    Y,
                    bias,
                    p,
                    h * _SQUARE,
                    mb * _SQUARE,
                    _token(p, tt) + mb * _SQUARE,
                    _row(p, tt) // GR * GC + h * _SQUARE,
                )
        else:
            for m in range(MV):
                if _token(p, tt) + m < M:
                    for n in T.vectorized(GC):
                        Y[_token(p, tt) + m, _row(p, tt) // GR * GC + n] = act(
                            S[p, n, m] + bias[_row(p, tt) // GR * GC + n]
                        )

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
        XP = T.alloc_buffer((P, MOP, K, MV) if packs else (1, 1, 1, 1), "float32")
        S = T.alloc_buffer((P, GC, MV) if not spec.y_transposed else (1, 1, 1), "float32")
        for p in T.parallel(P):
            if packs:
                for io in range(MOP):
                    if whole and _tile_start(p, io) + MV <= M:
                        for kb, mb in T.grid(K // _SQUARE, MV // _SQUARE):
                            for q in T.unroll(_SQUARE):
                                XP[p, io, kb * _SQUARE + q, T.Ramp(mb * _SQUARE, 1, _SQUARE)] = (
                                    transposed_row(X, [], _tile_start(p, io) + mb * _SQUARE, kb * _SQUARE, q)
                                )
                    else:  # the ragged last tile: zeros past M accumulate nothing
                        for kk, mm in T.grid(K, MV):
                            XP[p, io, kk, mm] = T.if_then_else(
                                _tile_start(p, io) + mm < M, X[_tile_start(p, io) + mm, kk], T.float32(0)
                            )
            for tt in range(MOP * NBP + 1):
                # A group's columns of Y are written at the start of the step after the group's
                # last: written in that step, 16×1 blocks at 90% ran 10% slower (BERT FFN1).
                if not spec.y_transposed and tt > 0 and tt % GR == 0:
                    write_group(S, Y, bias, p, tt - 1)
                if tt < MOP * NBP:
                    for rc in range(R // RT):
                        acc = T.alloc_buffer((RT, MV), "float32", scope="local")
                        for r in T.unroll(RT):
                            for m in T.vectorized(MV):
                                acc[r, m] = T.float32(0)
                        for e in range(W_indptr[_row(p, tt)], W_indptr[_row(p, tt) + 1]):
                            for c in T.unroll(C):
                                for r in T.unroll(RT):
                                    for m in T.vectorized(MV):
                                        if packs:
                                            acc[r, m] = (
                                                acc[r, m]
                                                + W_data[e, c, rc * RT + r]
                                                * XP[p, _tile(tt), W_indices[e] * C + c, m]
                                            )
                                        else:
                                            acc[r, m] = (
                                                acc[r, m]
                                                + W_data[e, c, rc * RT + r]
                                                * X[W_indices[e] * C + c, _token(p, tt) + m]
                                            )
                        if spec.y_transposed:
                            for r in T.unroll(RT):
                                for m in T.vectorized(MV):
                                    Y[_row(p, tt) * R + rc * RT + r, _token(p, tt) + m] = act(
                                        acc[r, m] + bias[_row(p, tt) * R + rc * RT + r]
                                    )
                        else:
                            for r in T.unroll(RT):
                                for m in T.vectorized(MV):
                                    S[p, tt % GR * R + rc * RT + r, m] = acc[r, m]

    return main
