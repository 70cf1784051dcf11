"""The token-major activation layout two sparse linears hand over: ``Yᵀ`` stored ``[N, pitch]``.

The kernels (``tilefx.lowering.kernels``) compute in it and the runtime modules
(``runtime.sparse_modules``) allocate and recognise it, so its arithmetic lives here, in a module
that imports nothing: lowering depends on the runtime, never the other way round.
"""

from __future__ import annotations

__all__ = ["token_pitch"]


def token_pitch(tokens: int) -> int:
    """Row length of a transposed activation ``[features, pitch]`` holding ``tokens`` columns.

    Token-major kernels run whole tiles of tokens, so the pitch pads M to one: to 64 (the tile
    of 16 accumulators on AVX-512, a multiple of AVX2's) from 64 tokens on, to whole vectors of
    16 below, as the row-major kernels pad internally. Padding to 16 everywhere left M = 168
    (MiniLM's 12 × 14 tokens) with 16-token tiles, which made its FFN slower, not faster.
    """
    align = 64 if tokens >= 64 else 16
    return -(-tokens // align) * align
