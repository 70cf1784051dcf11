"""The fast TETRIS is the old TETRIS: bit-identical orders, masks and objective history.

The reference below is the EM as it was before it was made fast (every quantity recomputed from
scratch: the permuted weights, one swap-cost table per use, the objective over every operand) and
scipy's ``linear_sum_assignment`` for the cluster start's balanced assignment. It lives here, and
only here, so that the package keeps one implementation and this file can say it still computes
the same numbers.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from tilefx.passes.analysis import tetris as tetris_module
from tilefx.passes.analysis import tetris_init
from tilefx.passes.analysis.balanced_assignment import balanced_groups
from tilefx.passes.analysis.block_selection import block_sums, lowest_blocks
from tilefx.passes.analysis.tetris import BEST, FAITHFUL, FAST, Concat, Operand, TetrisOptions, tetris
from tilefx.passes.analysis.tetris_em import State, em, greedy_swaps
from tilefx.passes.analysis.tetris_init import initial_orders
from tilefx.passes.analysis.tetris_problem import Problem, Use


# ----- the reference: the EM before it was made fast ----------------------------------------------
def _reference_greedy_swaps(cost: np.ndarray, tol: float) -> np.ndarray:
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


def _reference_e_step(problem: Problem, orders: Mapping[Hashable, np.ndarray]) -> State:
    grids, objective = [], 0.0
    for k in range(len(problem.magnitudes)):
        sums = block_sums(problem.permuted(k, orders), problem.sizes[k])
        keep = lowest_blocks(sums, problem.rates[k])
        grids.append(keep)
        objective += float(sums[~keep].sum())
    return State(dict(orders), tuple(grids), objective)


def _reference_em(
    problem: Problem,
    orders: Mapping[Hashable, np.ndarray],
    *,
    tol: float,
    max_iters: int,
    final_e_step: bool,
    m_step: object = None,
    on_round: object = None,
) -> State:
    current = _reference_e_step(problem, orders)
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
            value, orders = _reference_move(problem, var, orders, grids, value, tol)
            history.append(value)
        if prev - value < tol or iterations >= max_iters:
            break
        current = _reference_e_step(problem, orders)
    final = State(dict(orders), grids, value, tuple(history), iterations)
    if not final_e_step:
        return final
    refreshed = _reference_e_step(problem, orders)
    if refreshed.objective > value:
        return final
    return State(
        refreshed.orders,
        refreshed.grids,
        refreshed.objective,
        final.history + (refreshed.objective,),
        iterations,
    )


def _reference_move(
    problem: Problem,
    var: Hashable,
    orders: Mapping[Hashable, np.ndarray],
    grids: Sequence[np.ndarray],
    value: float,
    tol: float,
) -> tuple[float, Mapping[Hashable, np.ndarray]]:
    n = problem.lengths[var]
    cost = np.zeros((n, n))
    for use in problem.uses[var]:
        cost += _reference_swap_cost(problem, use, orders, grids[use.operand], n)
    relative = _reference_greedy_swaps(cost, tol)
    if np.array_equal(relative, np.arange(n)):
        return value, orders
    moved = {**orders, var: orders[var][relative]}
    new_value = sum(
        float(block_sums(problem.permuted(k, moved), problem.sizes[k])[~grids[k]].sum())
        for k in range(len(problem.magnitudes))
    )
    if new_value > value:
        return value, orders
    return new_value, moved


def _reference_swap_cost(
    problem: Problem, use: Use, orders: Mapping[Hashable, np.ndarray], grid: np.ndarray, n: int
) -> np.ndarray:
    sizes = problem.sizes[use.operand]
    permuted = problem.permuted(use.operand, orders)
    others = [b if a != use.axis else 1 for a, b in enumerate(sizes)]
    reduced = block_sums(permuted, others)
    pruned = (~grid).astype(np.float64)
    table = np.moveaxis(reduced, use.axis, 0).reshape(reduced.shape[use.axis], -1) @ (
        np.moveaxis(pruned, use.axis, 0).reshape(pruned.shape[use.axis], -1).T
    )
    positions = use.offset + np.arange(n)
    return table[positions][:, positions // sizes[use.axis]]


def _scipy_groups(cost: np.ndarray, size: int) -> np.ndarray:
    rows, slots = linear_sum_assignment(np.repeat(cost, size, axis=1))
    group = np.empty(len(cost), dtype=np.int64)
    group[rows] = slots // size
    return group


# ----- problems -----------------------------------------------------------------------------------
def _w(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Magnitudes with hidden row/column structure (as in test_tetris.py)."""
    g = torch.Generator().manual_seed(seed)
    w = (
        torch.randn(rows, cols, generator=g)
        * torch.rand(rows, 1, generator=g)
        * torch.rand(1, cols, generator=g)
    )
    return w[torch.randperm(rows, generator=g)][:, torch.randperm(cols, generator=g)]


def _problems(seed: int) -> dict[str, tuple[list[Operand], float]]:
    heads = Concat(tuple(("qk", 16) for _ in range(4)))  # one group repeated per head, as a head split gives
    return {
        "single": ([Operand(_w(64, 96, seed), (0, 1), (8, 8))], 0.75),
        "thin": ([Operand(_w(96, 64, seed), (0, 1), (16, 1))], 0.8),
        "chain": (
            [
                Operand(_w(64, 32, seed + 1), ("h", "x"), (8, 1)),
                Operand(_w(48, 64, seed + 2), ("y", "h"), (16, 1)),
                Operand(_w(64, 48, seed + 3), ("h", "y"), (4, 4)),
            ],
            0.7,
        ),
        "heads": (
            [
                Operand(_w(64, 48, seed + 4), (heads, None), (8, 1)),
                Operand(_w(64, 32, seed + 5), (heads, "r"), (16, 1)),
            ],
            0.8,
        ),
        "concat": (
            [
                Operand(_w(32, 16, seed + 6), ("a", None), (8, 0)),
                Operand(_w(48, 16, seed + 7), ("b", None), (8, 0)),
                Operand(_w(24, 80, seed + 8), (None, Concat((("a", 32), ("b", 48)))), (0, 8)),
            ],
            0.5,
        ),
        "two_axes": ([Operand(_w(48, 48, seed + 9), ("v", "v"), (8, 8))], 0.6),
        "conv": (
            [
                Operand(
                    torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(seed)),
                    (0, 1, None, None),
                    (8, 4, 0, 0),
                )
            ],
            0.5,
        ),
        "ffn": (
            [
                Operand(_w(256, 96, seed + 10), ("f", None), (16, 1)),
                Operand(_w(96, 256, seed + 11), (None, "f"), (16, 1)),
            ],
            0.8,
        ),
    }


CASES = [(seed, name) for seed in range(3) for name in _problems(0)]


def _same_state(a: State, b: State) -> None:
    assert a.orders.keys() == b.orders.keys()
    for var in a.orders:
        np.testing.assert_array_equal(a.orders[var], b.orders[var])
    assert len(a.grids) == len(b.grids)
    for x, y in zip(a.grids, b.grids, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.history == b.history  # floats compared exactly
    assert a.objective == b.objective and a.iterations == b.iterations


@pytest.mark.parametrize(("seed", "name"), CASES)
@pytest.mark.parametrize("start", ["identity", "cluster", "shuffled"])
def test_em_is_bit_identical_to_the_reference(seed: int, name: str, start: str) -> None:
    operands, sparsity = _problems(seed)[name]
    problem = Problem.build(operands, sparsity)
    if start == "shuffled":
        rng = np.random.default_rng(seed)
        orders = {var: rng.permutation(n) for var, n in problem.lengths.items()}
    else:
        orders = initial_orders(problem, start, seed)  # type: ignore[arg-type]
    for final_e_step in (False, True):
        options = {"tol": 1e-5, "max_iters": 100, "final_e_step": final_e_step}
        _same_state(em(problem, orders, **options), _reference_em(problem, orders, **options))  # type: ignore[arg-type]


@pytest.mark.parametrize(("seed", "name"), CASES)
@pytest.mark.parametrize(
    "options",
    [FAITHFUL, FAST, BEST, TetrisOptions(init="cluster", restarts=1)],
    ids=["faithful", "fast", "best", "cluster"],
)
def test_tetris_is_bit_identical_to_the_reference(
    seed: int, name: str, options: TetrisOptions, monkeypatch: pytest.MonkeyPatch
) -> None:
    operands, sparsity = _problems(seed)[name]
    fast = tetris(operands, sparsity, options)
    monkeypatch.setattr(tetris_module, "em", _reference_em)
    monkeypatch.setattr(tetris_init, "balanced_groups", _scipy_groups)
    slow = tetris(operands, sparsity, options)
    assert fast.orders.keys() == slow.orders.keys()
    assert all(torch.equal(fast.orders[v], slow.orders[v]) for v in fast.orders)
    assert all(torch.equal(a, b) for a, b in zip(fast.keep, slow.keep, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(fast.block_keep, slow.block_keep, strict=True))
    assert fast.history == slow.history and fast.iterations == slow.iterations


@pytest.mark.parametrize("seed", range(20))
def test_greedy_swaps_is_bit_identical_to_the_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 80))
    cost = rng.random((n, n)) if seed % 2 else rng.integers(0, 3, (n, n)).astype(float)  # ties too
    np.testing.assert_array_equal(greedy_swaps(cost, 1e-5), _reference_greedy_swaps(cost, 1e-5))


@pytest.mark.parametrize("seed", range(60))
def test_balanced_groups_are_scipys(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k, size = int(rng.integers(2, 16)), int(rng.integers(1, 12))
    n = k * size
    kind = seed % 4
    if kind == 0:  # squared distances to centroids, as the cluster start builds them
        points, centres = rng.random((n, 5)), rng.random((k, 5))
        cost = ((points[:, None] - centres[None]) ** 2).sum(-1)
    elif kind == 1:
        cost = rng.random((n, k))
    elif kind == 2:  # many exact ties: the check must hand these to scipy
        cost = rng.integers(0, 4, (n, k)).astype(float)
    else:  # duplicated points: ties again
        cost = np.repeat(rng.random((n // size, k)), size, axis=0)[rng.permutation(n)]
    np.testing.assert_array_equal(balanced_groups(cost, size), _scipy_groups(cost, size))


def test_balanced_groups_rejects_what_does_not_fill_the_groups() -> None:
    with pytest.raises(ValueError, match="groups"):
        balanced_groups(np.zeros((7, 2)), 3)
