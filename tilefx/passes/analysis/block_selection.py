"""Block sums and lowest-L1 block selection on N-d weights (the E-step of TETRIS, and naive block pruning).

A block grid over an N-d tensor is given by per-axis block sizes; 0 means "the whole axis" (as in the
TETRIS authors' code). A conv block that spans the kernel is ``(b_out, b_in, 0, 0)`` on the 4-d weight,
which is the same set of elements as ``(b_out, b_in·kh·kw)`` on the matrix view.

Contract: a grid must tile the tensor exactly (``n % b == 0`` on every axis); callers that want a
partial last block zero-pad first (see :func:`pad_to_blocks`). Exactly ``floor(sparsity · #blocks)``
blocks are pruned; ties are broken by the lowest flat block index (stable sort), so results are
deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tilefx.errors import RecipeError, WeightError

__all__ = [
    "block_grid",
    "block_sums",
    "check_finite",
    "check_sparsity",
    "expand_blocks",
    "lowest",
    "lowest_blocks",
    "num_pruned_blocks",
    "pad_to_blocks",
]


def check_sparsity(sparsity: float, what: str = "sparsity") -> None:
    """Sparsity is a fraction of blocks (or connections) to remove, in ``[0, 1)``."""
    if not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) < 1.0):
        raise RecipeError(f"{what} must be in [0, 1), got {sparsity!r}; 1.0 would remove every weight")


def check_finite(weight: np.ndarray, name: str = "weight") -> None:
    if not np.isfinite(weight).all():
        bad = int((~np.isfinite(weight)).sum())
        raise WeightError(f"{name} has {bad} NaN/inf entries; block selection needs finite weights")


def block_grid(shape: Sequence[int], block: Sequence[int], *, pad: bool = False) -> tuple[int, ...]:
    """Resolved block sizes (0 → whole axis). Raises :class:`RecipeError` if a size does not divide."""
    if len(block) != len(shape):
        raise RecipeError(
            f"block {tuple(block)} has {len(block)} axes but the weight has {len(shape)}: {tuple(shape)}"
        )
    sizes = tuple(n if b == 0 else b for n, b in zip(shape, block, strict=True))
    for axis, (n, b) in enumerate(zip(shape, sizes, strict=True)):
        if b < 0 or b > n:
            raise RecipeError(
                f"block size {b} on axis {axis} is outside [0, {n}] for weight shape {tuple(shape)}"
            )
        if n % b and not pad:
            raise RecipeError(
                f"block {tuple(block)} does not tile weight shape {tuple(shape)} (axis {axis}: {n} % {b} != 0); "
                "choose a dividing block, or pad=True for a zero-padded partial last block"
            )
    return sizes


def pad_to_blocks(weight: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Zero-pad every axis up to a multiple of its block size (a no-op when they already divide)."""
    widths = [(0, -n % b) for n, b in zip(weight.shape, sizes, strict=True)]
    return np.pad(weight, widths) if any(w for _, w in widths) else weight


def block_sums(magnitude: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Sum of ``magnitude`` over every block: an array of the block-grid's shape."""
    split = [d for n, b in zip(magnitude.shape, sizes, strict=True) for d in (n // b, b)]
    return magnitude.reshape(split).sum(axis=tuple(range(1, 2 * magnitude.ndim, 2)))


def num_pruned_blocks(num_blocks: int, sparsity: float) -> int:
    """The authors' count, ``int(num_blocks · rate)`` (floor), guarded against float noise."""
    return min(num_blocks, math.floor(num_blocks * sparsity + 1e-9))


def lowest_blocks(sums: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask over the block grid: False for the ``floor(sparsity·#blocks)`` smallest sums."""
    return lowest(sums, num_pruned_blocks(sums.size, sparsity))


def lowest(scores: np.ndarray, count: int, prefer: np.ndarray | None = None) -> np.ndarray:
    """Keep-mask: False for the ``count`` smallest scores.

    Ties go first to entries where ``prefer`` is True (e.g. already pruned, so a second run picks
    the same set), then to the lowest flat index.
    """
    flat = scores.ravel()
    order = np.argsort(flat, kind="stable") if prefer is None else np.lexsort((~prefer.ravel(), flat))
    keep = np.ones(flat.size, dtype=bool)
    keep[order[:count]] = False
    return keep.reshape(scores.shape)


def expand_blocks(grid_mask: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Element mask from a block-grid mask (each block entry repeated over its block)."""
    out = grid_mask
    for axis, b in enumerate(sizes):
        out = np.repeat(out, b, axis=axis)
    return out
