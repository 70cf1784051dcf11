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
from .tetris_problem import Problem, Use

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
    g = d[:, None] + d[None, :] - s - s.T
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
        for k in (i, j):
            better = g[:, k] > best
            arg[better] = k
            best[better] = g[better, k]


def e_step(problem: Problem, orders: Mapping[Hashable, np.ndarray]) -> State:
    """Every operand's lowest-L1 blocks under ``orders``."""
    grids, objective = [], 0.0
    for k in range(len(problem.magnitudes)):
        sums = block_sums(problem.permuted(k, orders), problem.sizes[k])
        keep = lowest_blocks(sums, problem.rates[k])
        grids.append(keep)
        objective += float(sums[~keep].sum())
    return State(dict(orders), tuple(grids), objective)


def em(
    problem: Problem,
    orders: Mapping[Hashable, np.ndarray],
    *,
    tol: float,
    max_iters: int,
    final_e_step: bool,
    m_step: MStep = greedy_swaps,
) -> State:
    """EM from ``orders``; ``final_e_step`` re-selects the blocks once more after convergence.

    The authors return the mask of the last E-step; the final one can only lower the objective.
    """
    current = e_step(problem, orders)
    orders = current.orders
    history: list[float] = []
    iterations = 0
    while True:
        iterations += 1
        history.append(current.objective)
        prev = current.objective
        grids = current.grids
        value = prev
        for var in problem.uses:
            value, orders = _move(problem, var, orders, grids, value, tol, m_step)
            history.append(value)
        if prev - value < tol or iterations >= max_iters:
            break
        current = e_step(problem, orders)
    final = State(orders, grids, value, tuple(history), iterations)
    if not final_e_step:
        return final
    refreshed = e_step(problem, orders)
    if refreshed.objective > value:
        return final
    return replace(refreshed, history=final.history + (refreshed.objective,), iterations=iterations)


def _move(
    problem: Problem,
    var: Hashable,
    orders: dict[Hashable, np.ndarray],
    grids: Sequence[np.ndarray],
    value: float,
    tol: float,
    m_step: MStep,
) -> tuple[float, dict[Hashable, np.ndarray]]:
    """One M-step for ``var``: the new objective and orders (unchanged where it would not help)."""
    n = problem.lengths[var]
    cost = np.zeros((n, n))
    for use in problem.uses[var]:
        cost += _swap_cost(problem, use, orders, grids[use.operand], n)
    relative = m_step(cost, tol)
    if np.array_equal(relative, np.arange(n)):
        return value, orders
    moved = {**orders, var: orders[var][relative]}
    new_value = _objective(problem, moved, grids)
    if new_value > value:  # only possible when a variable labels two axes of one operand
        return value, orders
    return new_value, moved


def _objective(problem: Problem, orders: Mapping[Hashable, np.ndarray], grids: Sequence[np.ndarray]) -> float:
    return sum(
        float(block_sums(problem.permuted(k, orders), problem.sizes[k])[~grids[k]].sum())
        for k in range(len(problem.magnitudes))
    )


def _swap_cost(
    problem: Problem, use: Use, orders: Mapping[Hashable, np.ndarray], grid: np.ndarray, n: int
) -> np.ndarray:
    """``S[i, j]``: this use's pruned magnitude if current slice i is put at position j."""
    sizes = problem.sizes[use.operand]
    permuted = problem.permuted(use.operand, orders)
    # Sum within blocks along every other axis, then contract with the block mask: T[i, r].
    others = [b if a != use.axis else 1 for a, b in enumerate(sizes)]
    reduced = block_sums(permuted, others)
    pruned = (~grid).astype(np.float64)
    table = np.moveaxis(reduced, use.axis, 0).reshape(reduced.shape[use.axis], -1) @ (
        np.moveaxis(pruned, use.axis, 0).reshape(pruned.shape[use.axis], -1).T
    )
    positions = use.offset + np.arange(n)
    return table[positions][:, positions // sizes[use.axis]]
