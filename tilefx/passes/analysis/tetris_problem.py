"""A TETRIS problem: weights whose axes carry shared permutation variables (docs/methods.md, TETRIS).

The authors reorder one tensor at a time. Folding the orders into neighbouring layers needs
*shared* variables instead, so a problem is stated as a list of :class:`Operand` s:

- each is an N-d weight with, per axis, a permutation variable id (any hashable; ``None`` = the
  axis stays fixed) and a block size (0 = whole axis);
- one variable may label several (operand, axis) pairs (W1's out axis and W2's in axis, or every
  residual-stream axis); all of them get the same order;
- an axis may instead be a :class:`Concat` of segments with their own variables (block-diagonal
  order): the input axis of a consumer of ``cat``, or the out axis of a grouped conv whose channels
  may only move within their group.

:class:`Problem` is that statement resolved once (|W| in float64, zero-padded to whole blocks with
``pad=True``; the padding stays at the end and is never permuted), with the views every search step
needs. Malformed operands raise :class:`RecipeError`, NaN/inf weights :class:`WeightError`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tilefx.errors import RecipeError

from .block_selection import block_grid, check_finite, check_sparsity, num_pruned_blocks, pad_to_blocks

__all__ = ["Concat", "Operand", "Plane", "Problem", "Use"]


@dataclass(frozen=True)
class Concat:
    """An axis made of consecutive segments with their own variables: a block-diagonal permutation.

    ``parts``: ``((variable or None, length), ...)`` in axis order; the lengths must sum to the axis.
    This is what the input axis of a consumer of ``cat`` needs (each producer keeps its own order).
    """

    parts: tuple[tuple[Hashable | None, int], ...]


@dataclass(frozen=True, eq=False)
class Operand:
    """One weight in a TETRIS problem.

    ``variables[d]``: the permutation variable of axis ``d`` (hashable id), None (axis fixed), or a
    :class:`Concat` of segment variables.
    ``block[d]``: block size along axis ``d``; 0 = the whole axis. ``sparsity``: this operand's
    fraction of blocks to prune (None = the call's). ``name`` is used in error messages.
    """

    weight: torch.Tensor
    variables: tuple[Hashable | Concat | None, ...]
    block: tuple[int, ...]
    sparsity: float | None = None
    name: str = "weight"


@dataclass(frozen=True)
class Use:
    """One place a variable orders: an axis of an operand, from ``offset`` on (a Concat segment)."""

    operand: int
    axis: int
    offset: int = 0


@dataclass(frozen=True)
class Plane:
    """One operand as a 2-d problem: its two block axes, every whole-block axis summed out."""

    variables: tuple[Hashable | None, Hashable | None]  # row, column variable (None = fixed axis)
    a: np.ndarray  # magnitude summed over the whole-block axes
    block: tuple[int, int]
    keep: int  # blocks kept


@dataclass
class Problem:
    magnitudes: list[np.ndarray]  # |W|, zero-padded to whole blocks, float64, original coordinates
    sizes: list[tuple[int, ...]]  # resolved block sizes per operand
    rates: tuple[float, ...]  # per-operand sparsity
    uses: dict[Hashable, list[Use]]  # variable -> its (operand, axis) pairs, in first-appearance order
    lengths: dict[Hashable, int]  # variable -> real (unpadded) axis length
    shapes: list[tuple[int, ...]]  # original (unpadded) shapes

    @classmethod
    def build(cls, operands: Sequence[Operand], sparsity: float, *, pad: bool = False) -> Problem:
        check_sparsity(sparsity)
        if not operands:
            raise RecipeError("tetris needs at least one operand")
        magnitudes, sizes, rates, shapes = [], [], [], []
        uses: dict[Hashable, list[Use]] = {}
        lengths: dict[Hashable, int] = {}
        for k, op in enumerate(operands):
            shape = tuple(op.weight.shape)
            if len(op.variables) != len(shape):
                raise RecipeError(
                    f"{op.name}: {len(op.variables)} variables for a {len(shape)}-d weight {shape}"
                )
            rate = sparsity if op.sparsity is None else op.sparsity
            check_sparsity(rate, f"{op.name}: sparsity")
            magnitude = op.weight.detach().to("cpu", torch.float64).abs().numpy()
            check_finite(magnitude, op.name)
            grid = block_grid(shape, op.block, pad=pad)
            for axis, spec in enumerate(op.variables):
                for var, offset, length in _segments(spec, shape[axis], f"{op.name} axis {axis}"):
                    if lengths.setdefault(var, length) != length:
                        raise RecipeError(
                            f"permutation variable {var!r} has length {lengths[var]} elsewhere but "
                            f"{op.name} axis {axis} gives it length {length}"
                        )
                    uses.setdefault(var, []).append(Use(k, axis, offset))
            magnitudes.append(pad_to_blocks(magnitude, grid))
            sizes.append(grid)
            rates.append(float(rate))
            shapes.append(shape)
        return cls(magnitudes, sizes, tuple(rates), uses, lengths, shapes)

    def axis_orders(self, k: int, orders: Mapping[Hashable, np.ndarray]) -> dict[int, np.ndarray]:
        """Per permuted axis of operand k: new position -> old position over the whole (padded) axis."""
        shape = self.magnitudes[k].shape
        indices: dict[int, np.ndarray] = {}
        for var, use_list in self.uses.items():
            for use in use_list:
                if use.operand == k:
                    index = indices.setdefault(use.axis, np.arange(shape[use.axis]))
                    index[use.offset : use.offset + len(orders[var])] = use.offset + orders[var]
        return indices

    def permuted(self, k: int, orders: Mapping[Hashable, np.ndarray]) -> np.ndarray:
        """Operand k's magnitude in the coordinates given by ``orders`` (padding stays at the end)."""
        out = self.magnitudes[k]
        for axis, index in self.axis_orders(k, orders).items():
            out = np.take(out, index, axis=axis)
        return out

    def segment(self, use: Use, n: int) -> np.ndarray:
        """The ``n`` slices of ``use``'s operand that its variable's segment covers (original order)."""
        return np.take(self.magnitudes[use.operand], np.arange(use.offset, use.offset + n), axis=use.axis)

    def plane(self) -> Plane | None:
        """One operand whose permuted axes are two block axes (or one of them), as a 2-d problem.

        Every other axis must be whole-block (summed out); each variable has one use, offset 0.
        """
        pairs = [(v, u) for v, us in self.uses.items() for u in us]
        if len(self.magnitudes) != 1 or not 0 < len(pairs) <= 2 or any(u.offset for _, u in pairs):
            return None
        magnitude, sizes = self.magnitudes[0], self.sizes[0]
        axes = tuple(d for d in range(magnitude.ndim) if sizes[d] != magnitude.shape[d])
        by_axis = {u.axis: v for v, u in pairs}
        if len(axes) != 2 or len(by_axis) != len(pairs) or not set(by_axis) <= set(axes):
            return None
        blocks = magnitude.size // int(np.prod(sizes))
        others = tuple(d for d in range(magnitude.ndim) if d not in axes)
        return Plane(
            (by_axis.get(axes[0]), by_axis.get(axes[1])),
            magnitude.sum(axis=others) if others else magnitude,
            (sizes[axes[0]], sizes[axes[1]]),
            blocks - num_pruned_blocks(blocks, self.rates[0]),
        )


def _segments(spec: Hashable | Concat | None, length: int, where: str) -> list[tuple[Hashable, int, int]]:
    """(variable, offset, length) for every permuted segment of one axis."""
    if spec is None:
        return []
    if not isinstance(spec, Concat):
        return [(spec, 0, length)]
    if sum(n for _, n in spec.parts) != length or any(n < 1 for _, n in spec.parts):
        raise RecipeError(f"{where}: Concat parts {spec.parts} do not add up to the axis length {length}")
    out, offset = [], 0
    for var, n in spec.parts:
        if var is not None:
            out.append((var, offset, n))
        offset += n
    return out
