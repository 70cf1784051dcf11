"""The TETRIS EM: alternate block selection and permutation moves while the pruned L1 falls.

A port of the authors' ``blocksparse`` (``SEAL-UCSB/block_compression/accuracy/compress.py``;
docs/methods.md, TETRIS) over a :class:`~.tetris_problem.Problem`, so one variable may order
several axes:

- **E-step**, per operand: prune its ``floor(sparsity · #blocks)`` lowest-L1 blocks under the current
  orders (each operand prunes its own fraction);
- **M-step**, per variable (in order of first appearance), mask held fixed:
  ``S[i, j] = Σ_(operand, axis) pruned magnitude if current slice i is moved to position j``, summed
  over every use of the variable, then handed to an :data:`MStep` solver: by default
  :func:`greedy_swaps`, the authors' max-gain pair swaps on ``G = diag(S) + diag(S)ᵀ − S − Sᵀ``;
- stop when one E+M round lowers the total pruned magnitude by less than ``tol`` (the authors'
  rule; 1e-5 as in their NumPy version), or after ``max_iters`` rounds.

Two deliberate differences from the authors' code, both only in *how* the same greedy choice is
computed: (1) they cache per-row maxima of G and refresh only some rows after a swap, so the cached
maximum can go stale and a swap with negative true gain can be taken; here the cache is refreshed
for every row whose maximum sat in column i or j, so every swap is the true max-gain swap and the
objective never increases; (2) S and G are kept in float64.

If one variable labels two axes of the *same* operand, the M-step's S is only an estimate (moving
both axes at once is not linear in the mask); an M-step that would raise the objective is then
rejected, so monotonicity still holds.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .block_selection import block_sums, lowest_blocks
from .tetris_problem import Problem

__all__ = ["MStep", "State", "e_step", "em", "greedy_swaps"]

# (S, tol) -> relative order: new position p holds current slice order[p]; the identity = no move.
MStep = Callable[[np.ndarray, float], np.ndarray]


@dataclass(frozen=True)
class State:
    """Orders and the block masks chosen under them, with the objective (total pruned L1)."""

    orders: dict[Hashable, np.ndarray]
    grids: tuple[np.ndarray, ...]  # per operand: bool keep-mask over the block grid (permuted coords)
    objective: float
    history: tuple[float, ...] = ()  # objective after every E-step and every M-step (non-increasing)
    iterations: int = 0


def greedy_swaps(cost: np.ndarray, tol: float) -> np.ndarray:
    """The authors' M-step: repeatedly swap the pair with the largest gain while it is ≥ tol."""
    s = cost.copy()
    n = len(s)
    order = np.arange(n)
    d = np.diagonal(s).copy()
    g = np.add.outer(d, d)  # G = diag(S) + diag(S)ᵀ − S − Sᵀ, in that order of operations
    g -= s
    g -= s.T
    arg = g.argmax(axis=1)
    best = g[np.arange(n), arg]
    while True:
        i = int(best.argmax())
        if best[i] < tol:
            return order
        j = int(arg[i])
        s[[i, j]] = s[[j, i]]
        order[[i, j]] = order[[j, i]]
        d[i], d[j] = s[i, i], s[j, j]
        for k in (i, j):
            row = d + d[k] - s[k, :] - s[:, k]
            g[k, :] = row
            g[:, k] = row
        stale = (arg == i) | (arg == j)
        stale[[i, j]] = True
        rows = np.flatnonzero(stale)
        arg[rows] = g[rows].argmax(axis=1)
        best[rows] = g[rows, arg[rows]]
        for k in (i, j):  # rows and columns i, j were just written alike: read the contiguous row
            column = g[k]
            better = column > best
            arg[better] = k
            best[better] = column[better]


def e_step(problem: Problem, orders: Mapping[Hashable, np.ndarray]) -> State:
    """Every operand's lowest-L1 blocks under ``orders``."""
    return _Sweep(problem, orders).e_step()


def em(
    problem: Problem,
    orders: Mapping[Hashable, np.ndarray],
    *,
    tol: float,
    max_iters: int,
    final_e_step: bool,
    m_step: MStep = greedy_swaps,
    on_round: Callable[[int, float], None] | None = None,
) -> State:
    """EM from ``orders``; ``final_e_step`` re-selects the blocks once more after convergence.

    The authors return the mask of the last E-step; the final one can only lower the objective.
    ``on_round(iterations, objective)`` is called after every E+M round (a progress bar).
    """
    sweep = _Sweep(problem, orders)
    current = sweep.e_step()
    history: list[float] = []
    iterations = 0
    while True:
        iterations += 1
        history.append(current.objective)
        prev = current.objective
        value = prev
        for var in problem.uses:
            value = sweep.move(var, value, tol, m_step)
            history.append(value)
        if on_round is not None:
            on_round(iterations, value)
        if prev - value < tol or iterations >= max_iters:
            break
        current = sweep.e_step()
    final = State(dict(sweep.orders), sweep.grids, value, tuple(history), iterations)
    if not final_e_step:
        return final
    refreshed = sweep.e_step()
    if refreshed.objective > value:
        return final
    return replace(refreshed, history=final.history + (refreshed.objective,), iterations=iterations)


class _Sweep:
    """The EM's working state: orders, the mask, and each operand's magnitude in the current orders.

    Every number is computed by the same numpy calls on the same arrays as a from-scratch
    evaluation (``problem.permuted`` then ``block_sums``), so results are bit-identical to one; what
    is saved is repetition. An operand is re-gathered only when one of its own orders moves (not
    for every use of every variable), the swap-cost table of an (operand, axis) is computed once
    per M-step however many segments of it the variable owns (one per attention head), and the
    objective after a move re-sums only the operands the moved variable touches.
    """

    def __init__(self, problem: Problem, orders: Mapping[Hashable, np.ndarray]) -> None:
        self.problem = problem
        self.orders = dict(orders)
        self.arrays = [problem.permuted(k, self.orders) for k in range(len(problem.magnitudes))]
        self.grids: tuple[np.ndarray, ...] = ()
        self.pruned: list[float] = []  # per operand: its pruned L1 under the orders and grids
        self.touches = {var: sorted({use.operand for use in uses}) for var, uses in problem.uses.items()}

    def e_step(self) -> State:
        """Every operand's lowest-L1 blocks under the current orders."""
        grids, pruned, objective = [], [], 0.0
        for k, array in enumerate(self.arrays):
            sums = block_sums(array, self.problem.sizes[k])
            keep = lowest_blocks(sums, self.problem.rates[k])
            grids.append(keep)
            pruned.append(float(sums[~keep].sum()))
            objective += pruned[-1]
        self.grids, self.pruned = tuple(grids), pruned
        return State(dict(self.orders), self.grids, objective)

    def move(self, var: Hashable, value: float, tol: float, m_step: MStep) -> float:
        """One M-step for ``var``: the new objective (the orders unchanged where it would not help)."""
        n = self.problem.lengths[var]
        relative = m_step(self._cost(var, n), tol)
        if np.array_equal(relative, np.arange(n)):
            return value
        moved = {**self.orders, var: self.orders[var][relative]}
        arrays = {k: self.problem.permuted(k, moved) for k in self.touches[var]}
        pruned = list(self.pruned)
        for k, array in arrays.items():
            pruned[k] = float(block_sums(array, self.problem.sizes[k])[~self.grids[k]].sum())
        new_value = sum(pruned)
        if new_value > value:  # only possible when a variable labels two axes of one operand
            return value
        self.orders, self.pruned = moved, pruned
        for k, array in arrays.items():
            self.arrays[k] = array
        return new_value

    def _cost(self, var: Hashable, n: int) -> np.ndarray:
        """``S[i, j]``: pruned magnitude, summed over every use of ``var``, if slice i moves to position j."""
        cost: np.ndarray | None = None
        tables: dict[tuple[int, int], np.ndarray] = {}
        for use in self.problem.uses[var]:
            key = (use.operand, use.axis)
            if key not in tables:
                tables[key] = _table(
                    self.arrays[use.operand],
                    self.grids[use.operand],
                    self.problem.sizes[use.operand],
                    use.axis,
                )
            part = _segment(tables[key], use.offset, n, self.problem.sizes[use.operand][use.axis])
            if cost is None:  # 0 + x is x: every entry is a sum of magnitudes, never -0 or NaN
                cost = part.copy() if np.shares_memory(part, tables[key]) else part
            else:
                cost += part
        assert cost is not None, f"variable {var!r} has no use"
        return cost


def _table(permuted: np.ndarray, grid: np.ndarray, sizes: Sequence[int], axis: int) -> np.ndarray:
    """``T[i, r]``: slice i's magnitude that block row r of ``axis`` would prune (every other axis summed in blocks)."""
    others = [b if a != axis else 1 for a, b in enumerate(sizes)]
    reduced = block_sums(permuted, others)
    pruned = (~grid).astype(np.float64)
    return np.moveaxis(reduced, axis, 0).reshape(reduced.shape[axis], -1) @ (
        np.moveaxis(pruned, axis, 0).reshape(pruned.shape[axis], -1).T
    )


def _segment(table: np.ndarray, offset: int, n: int, block: int) -> np.ndarray:
    """``table[p][:, p // block]`` for the positions ``p`` of one segment (a view where it can be)."""
    rows = table[offset : offset + n]
    if block == 1:
        return rows[:, offset : offset + n]
    if offset % block == 0 and n % block == 0:
        return np.repeat(rows[:, offset // block : (offset + n) // block], block, axis=1)
    return rows[:, (offset + np.arange(n)) // block]
