"""TETRIS experiments no preset uses, measured in benchmarks/results/tetris_quality.md.

Each composes the package's building blocks (``Problem``, ``search``, ``e_step``, ``tetris_result``)
the way ``tetris()`` does, with one change:

- :func:`assignment_tetris`: the EM with an exact M-step, the permutation minimising
  ``Σ_i S[i, π(i)]`` (``scipy.optimize.linear_sum_assignment``) instead of the authors' greedy
  swaps: the anchor's method. On MiniLM's 1536-wide axes it is ~10× slower than the greedy M-step
  for about the same objective, so no preset uses it.
- :func:`refined_tetris`: after the EM (and restarts), ``steps`` steps of a true-objective local
  search (below). On MiniLM (32,32)/80% it adds 0.4 points of gap over ``FAST`` (0.1 over ``BEST``)
  for ~4× ``BEST``'s time; it helps most at thin (16,1) blocks (+3.8 points over ``FAST``, ~17× the
  time). Only for one operand whose permuted axes are its two block axes (what ``tetris_weight``
  builds for 2-d and kernel-spanning conv blocks); other problems keep the EM result.

The true-objective search: EM's M-step moves slices with the block mask held fixed, so it stops
where no swap helps *that* mask, even where a swap would pay off once the top blocks are
re-selected. :func:`refine_orders` scores moves by the true objective instead: the L1 kept by the
``keep`` largest block sums.

- A move swaps two rows (or two columns) that sit in different block groups. Block sums change only
  in the two groups' block rows, by ``±(P[j] − P[i])`` where ``P`` holds every row's sums per column
  group, so a move is scored from O(#column groups) new sums.
- The kept total after a move is exact without sorting the whole grid: an unchanged block ranked
  below ``keep − 2w`` (``w`` changed sums per group row, 2 rows) stays kept and one ranked at or
  above ``keep + 2w`` stays pruned, so only that window of ranks and the ``2w`` new sums are sorted.
- Each step scores a batch of random candidate swaps (rows and columns), takes the best, and accepts
  it if it gains, or with probability ``exp(gain / T)`` (simulated annealing; ``T`` falls linearly
  to 0 over the steps, ``T₀`` = ``temperature`` × the median |gain| of the first batch). The best
  orders seen are returned, so the result is never worse than the warm start.

Deterministic for a seed; cost per step O(batch · w · log w). Imported by tetris_quality.py and
by tests/passes/test_tetris.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from tilefx.passes.analysis.tetris import (
    FAITHFUL,
    FAST,
    Operand,
    TetrisOptions,
    TetrisResult,
    search,
    tetris_result,
    weight_operand,
)
from tilefx.passes.analysis.tetris_em import State, e_step
from tilefx.passes.analysis.tetris_problem import Problem

__all__ = [
    "assignment_m_step",
    "assignment_tetris",
    "assignment_weight",
    "kept_sum",
    "refine_orders",
    "refined_tetris",
    "refined_weight",
]


# ----- the exact M-step ----------------------------------------------------------------------------
def assignment_m_step(cost: np.ndarray, tol: float) -> np.ndarray:
    """The permutation minimising ``Σ_i cost[i, π(i)]`` (relative order; identity if it gains < tol)."""
    rows, cols = linear_sum_assignment(cost)
    if np.trace(cost) - cost[rows, cols].sum() < tol:
        return np.arange(len(cost))
    order = np.empty(len(cost), dtype=np.int64)
    order[cols] = rows
    return order


def assignment_tetris(operands: Sequence[Operand], sparsity: float) -> TetrisResult:
    """``tetris(operands, sparsity, FAITHFUL)`` with :func:`assignment_m_step` as the M-step."""
    start = time.perf_counter()
    problem = Problem.build(operands, sparsity)
    state = search(problem, FAITHFUL, m_step=assignment_m_step)
    return tetris_result(problem, state, time.perf_counter() - start)


def assignment_weight(weight: torch.Tensor, block: Sequence[int], sparsity: float) -> TetrisResult:
    return assignment_tetris([weight_operand(weight, block)], sparsity)


# ----- the true-objective search after EM -----------------------------------------------------------
def refined_tetris(
    operands: Sequence[Operand],
    sparsity: float,
    options: TetrisOptions = FAST,
    *,
    steps: int,
    batch: int = 64,
    temperature: float = 0.1,
) -> TetrisResult:
    """``tetris(operands, sparsity, options)``, then :func:`refine_orders` where it applies."""
    start = time.perf_counter()
    problem = Problem.build(operands, sparsity, pad=options.pad)
    state = search(problem, options)
    refined = refine_state(
        problem, state, steps=steps, batch=batch, temperature=temperature, seed=options.seed
    )
    return tetris_result(problem, refined, time.perf_counter() - start)


def refined_weight(
    weight: torch.Tensor, block: Sequence[int], sparsity: float, options: TetrisOptions = FAST, *, steps: int
) -> TetrisResult:
    operand = weight_operand(weight, block, options.skip_unit_blocks)
    return refined_tetris([operand], sparsity, options, steps=steps)


def refine_state(
    problem: Problem, state: State, *, steps: int, batch: int, temperature: float, seed: int
) -> State:
    """True-objective search from ``state``'s orders; ``state`` itself where it does not apply or gain."""
    plane = problem.plane()
    if plane is None:
        return state
    given = tuple(np.arange(0) if v is None else state.orders[v] for v in plane.variables)
    movable = tuple(0 if v is None else problem.lengths[v] for v in plane.variables)
    found = refine_orders(
        plane.a,
        plane.block,
        plane.keep,
        (given[0], given[1]),
        (movable[0], movable[1]),
        steps=steps,
        batch=batch,
        temperature=temperature,
        seed=seed,
    )
    orders = dict(state.orders)
    for var, order in zip(plane.variables, found, strict=True):
        if var is not None:
            orders[var] = order[: problem.lengths[var]]
    refined = e_step(problem, orders)
    if refined.objective >= state.objective:
        return state
    return replace(refined, history=state.history + (refined.objective,), iterations=state.iterations)


def kept_sum(sums: np.ndarray, keep: int) -> float:
    """The sum of the ``keep`` largest entries (the true objective, as kept L1)."""
    flat = np.sort(sums.ravel())[::-1]
    return float(flat[:keep].sum())


def refine_orders(
    a: np.ndarray,
    block: tuple[int, int],
    keep: int,
    orders: tuple[np.ndarray, np.ndarray],
    movable: tuple[int, int],
    *,
    steps: int,
    batch: int,
    temperature: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Row and column orders of ``a`` that keep at least as much L1 in the top ``keep`` blocks.

    ``orders``: the warm start (new index p holds old index ``orders[d][p]``; a shorter order leaves
    the rest of the axis in place). ``movable[d]``: how many leading positions of axis d may move
    (0 = axis fixed; the rest is padding). Returns orders over the whole axes.
    """
    search = _Search.build(a, block, keep, orders)
    sides = [d for d in (0, 1) if movable[d] > 1 and search.groups[d] > 1]
    if not sides or not 0 < keep < search.grid.size:
        return search.snapshot()
    rng = np.random.default_rng(seed)
    best_value, best = search.value(), search.snapshot()
    tol = 1e-12 * float(a.sum())
    t0 = None
    for step in range(steps):
        gains, side, i, j = search.candidates(sides, movable, batch, rng)
        if t0 is None:
            moving = np.abs(gains[np.abs(gains) > tol])
            t0 = temperature * float(np.median(moving)) if len(moving) else 0.0
        t = t0 * (1.0 - step / steps)
        k = _pick(gains, t, tol, rng)
        if k is None:
            continue
        search.swap(int(side[k]), int(i[k]), int(j[k]))
        value = search.value()
        if value > best_value:
            best_value, best = value, search.snapshot()
    return best


def _pick(gains: np.ndarray, t: float, tol: float, rng: np.random.Generator) -> int | None:
    """The best move gaining > tol; else the first losing move that passes the Metropolis test at t.

    Moves within ±tol (round-off on a plateau, e.g. between two all-pruned groups) are never taken.
    """
    if not len(gains):  # every sampled pair shared a group
        return None
    k = int(gains.argmax())
    if gains[k] > tol:
        return k
    if t <= 0:
        return None
    passed = np.flatnonzero((gains < -tol) & (rng.random(len(gains)) < np.exp(gains / t)))
    return int(passed[0]) if len(passed) else None


@dataclass
class _Search:
    a: np.ndarray  # magnitude, original coordinates
    size: tuple[int, int]  # block size
    position: tuple[np.ndarray, np.ndarray]  # per axis: original index -> current position
    profiles: tuple[np.ndarray, np.ndarray]  # rows x column groups, columns x row groups
    grid: np.ndarray  # block sums, row groups x column groups
    keep: int

    @classmethod
    def build(
        cls, a: np.ndarray, block: tuple[int, int], keep: int, orders: tuple[np.ndarray, np.ndarray]
    ) -> _Search:
        position = tuple(_positions(order, n) for order, n in zip(orders, a.shape, strict=True))
        one_hot = [np.eye(n // b)[p // b] for p, n, b in zip(position, a.shape, block, strict=True)]
        rows, cols = a @ one_hot[1], a.T @ one_hot[0]
        return cls(a, block, (position[0], position[1]), (rows, cols), one_hot[0].T @ rows, keep)

    @property
    def groups(self) -> tuple[int, int]:
        return self.grid.shape[0], self.grid.shape[1]

    def value(self) -> float:
        return kept_sum(self.grid, self.keep)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        return np.argsort(self.position[0]), np.argsort(self.position[1])

    def _lines(self, side: int) -> np.ndarray:
        """The block grid with the moved axis first (a view, so updates reach ``grid``)."""
        return self.grid if side == 0 else self.grid.T

    def candidates(
        self, sides: list[int], movable: tuple[int, int], batch: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``batch`` random swaps per side across groups: gains, side, i, j (original indices)."""
        base = self.value()
        out = []
        for side in sides:
            order = np.argsort(self.position[side])[: movable[side]]
            group = self.position[side] // self.size[side]
            i, j = order[rng.integers(len(order), size=(2, batch))]
            apart = group[i] != group[j]
            i, j = i[apart], j[apart]
            delta = self.profiles[side][j] - self.profiles[side][i]
            gains = _after_swap(self._lines(side), self.keep, group[i], group[j], delta) - base
            out.append((gains, np.full(len(i), side), i, j))
        gains, sides_of, i, j = (np.concatenate(parts) for parts in zip(*out, strict=True))
        return gains, sides_of, i, j

    def swap(self, side: int, i: int, j: int) -> None:
        position, size = self.position[side], self.size[side]
        gi, gj = position[i] // size, position[j] // size
        delta = self.profiles[side][j] - self.profiles[side][i]
        lines = self._lines(side)
        lines[gi] += delta
        lines[gj] -= delta
        source = self.a if side == 0 else self.a.T
        moved = source[j] - source[i]
        other = self.profiles[1 - side]
        other[:, gi] += moved
        other[:, gj] -= moved
        position[i], position[j] = position[j], position[i]


def _after_swap(lines: np.ndarray, keep: int, a: np.ndarray, b: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Kept total after each candidate adds ``delta[k]`` to line ``a[k]`` and subtracts it from ``b[k]``.

    Exact: blocks ranked above the window stay kept, those below it stay pruned (module docstring).
    """
    width = lines.shape[1]
    flat = lines.ravel()
    order = np.argsort(-flat, kind="stable")
    ranked = flat[order]
    cumulative = np.concatenate([[0.0], np.cumsum(ranked)])
    lo, hi = max(keep - 2 * width, 0), min(keep + 2 * width, flat.size)
    rank = np.empty(flat.size, dtype=np.int64)
    rank[order] = np.arange(flat.size)
    above = rank.reshape(lines.shape) < lo
    above_count, above_sum = above.sum(axis=1), (lines * above).sum(axis=1)
    window_line = order[lo:hi] // width
    removed = (window_line == a[:, None]) | (window_line == b[:, None])
    window = np.where(removed, -np.inf, ranked[lo:hi])
    candidates = np.concatenate([window, lines[a] + delta, lines[b] - delta], axis=1)
    candidates = -np.sort(-candidates, axis=1)
    prefix = np.concatenate([np.zeros((len(a), 1)), np.cumsum(candidates, axis=1)], axis=1)
    need = keep - (lo - above_count[a] - above_count[b])
    sure = cumulative[lo] - above_sum[a] - above_sum[b]
    return sure + prefix[np.arange(len(a)), need]


def _positions(order: np.ndarray, n: int) -> np.ndarray:
    """Original index -> position over the whole axis ``n`` (indices past ``order`` stay in place)."""
    position = np.arange(n)
    position[order] = np.arange(len(order))
    return position
