"""TETRIS (Ji et al., NeurIPS 2018): reorder tensor axes so that small weights fill whole blocks.

A pure function over tensors (no fx). It ports the authors' EM algorithm (``blocksparse`` in
``SEAL-UCSB/block_compression/accuracy/compress.py``, seeds.md §1) and generalises it to
*shared permutation variables*, which folding reorderings into neighbouring layers needs:

- the input is a list of :class:`Operand` s; each is an N-d weight with, per axis, a permutation
  variable id (any hashable; ``None`` = the axis stays fixed) and a block size (0 = whole axis);
- one variable may label several (operand, axis) pairs (W1's out axis and W2's in axis, or every
  residual-stream axis); all of them get the same order;
- an axis may instead be a :class:`Concat` of segments with their own variables (block-diagonal
  order): the input axis of a consumer of ``cat``, or the out axis of a grouped conv whose
  channels may only move within their group;
- **E-step**, per operand: prune its ``floor(sparsity · #blocks)`` lowest-L1 blocks under the current
  orders (each operand prunes its own fraction);
- **M-step**, per variable (in order of first appearance), mask held fixed:
  ``S[i, j] = Σ_(operand, axis) pruned magnitude if current slice i is moved to position j``, summed
  over every use of the variable; then ``method="faithful"``: the authors' greedy max-gain pair swaps
  on ``G = diag(S) + diag(S)ᵀ − S − Sᵀ`` with incremental updates of G's rows/columns i, j while
  ``max G ≥ tol``; or ``method="assignment"`` (extension, not the paper's): the exact minimiser of
  ``Σ_i S[i, π(i)]`` by ``scipy.optimize.linear_sum_assignment``;
- stop when one E+M round lowers the total pruned magnitude by less than ``tol`` (the authors'
  rule; 1e-5 as in their NumPy version), or after ``max_iters`` rounds.

For a single operand whose every non-whole axis has its own variable, ``method="faithful"`` with
the default options is the authors' algorithm. Two deliberate differences, both only in *how* the
same greedy choice is computed: (1) the authors cache per-row maxima of G and refresh only some rows
after a swap, so the cached maximum can go stale and a swap with negative true gain can be taken;
here the cache is refreshed for every row whose maximum sat in column i or j, so every swap is the
true max-gain swap and the objective never increases; (2) S and G are kept in float64.

Extensions, each a documented option (off by default, so the faithful algorithm stays selectable);
the initial orders are in :mod:`.tetris_init`:

- ``init="norm"``: slices sorted by L1 norm (summed over the variable's uses);
  ``init="profile"``: spectral seriation of the slices' block-magnitude profiles;
  ``init="cluster"``: balanced k-means of those profiles, one cluster per block (helps thin blocks
  such as (16, 1), where only the row grouping matters);
  ``init="grow"``: greedy constructive co-clustering of one 2-d problem (kept blocks added one at a
  time from the best unplaced rows/columns; helps square blocks); falls back to "profile" where it
  does not apply (several operands, or a variable on two axes);
  ``init="auto"``: grow where it applies, else cluster (one EM run: :data:`FAST`);
  ``init="multi"``: EM from identity, cluster and grow, keeping the best;
- ``restarts=k``: iterated local search: perturb the best orders found (a random ``perturb`` fraction
  of each variable's positions reshuffled), re-run EM, keep the result if the objective fell;
- ``anneal=(s1, s2, ...)``: sparsity continuation: run EM at each of these sparsities in turn
  (warm-started), then at the target (measured: no gain on MiniLM; kept for experiments);
- ``refine=n``: after EM (and restarts), ``n`` steps of simulated annealing over single row/column
  swaps scored by the *true* objective (top blocks re-selected after every move; see
  :mod:`.tetris_refine`; ``refine_batch`` candidates per axis and step, ``refine_temperature``
  scales the start temperature). Only for one operand whose permuted axes are its two block axes
  (what ``tetris_weight`` builds for 2-d and kernel-spanning conv blocks); shared-variable or
  multi-operand problems keep the EM result. No preset uses it: on MiniLM (32,32)/80% it adds
  0.4 points of gap over ``FAST`` (0.1 over ``BEST``) for ~4× ``BEST``'s time (tetris_quality.md);
- ``final_e_step=True``: one more E-step after convergence (can only lower the objective; the
  authors return the mask of the last E-step);
- ``rtol``: also stop when a round gains less than ``rtol`` × the objective (speed);
- ``skip_unit_blocks`` (``tetris_weight`` only): no variable for an axis of block size 1.
:data:`BEST` is the combination measured best on MiniLM (benchmarks/tetris_quality.py).

If one variable labels two axes of the *same* operand, the M-step's S is only an estimate (moving
both axes at once is not linear in the mask); an M-step that would raise the objective is then
rejected, so monotonicity still holds.

Errors: :class:`RecipeError` (a ``ValueError``) for sparsity outside ``[0, 1)``, a block that does
not tile an axis (unless ``pad=True``: the axis is zero-padded to a multiple of the block, the
padding stays at the end and is never permuted), mismatched variable sizes or malformed operands;
:class:`WeightError` (a ``ValueError``) for NaN/inf weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..infra.errors import RecipeError
from .block_selection import (
    block_grid,
    block_sums,
    check_finite,
    check_sparsity,
    expand_blocks,
    lowest_blocks,
    num_pruned_blocks,
    pad_to_blocks,
)
from .tetris_init import cluster_order, grow_orders, norm_order, profile_order
from .tetris_refine import refine_orders

__all__ = [
    "BEST",
    "FAITHFUL",
    "FAST",
    "Concat",
    "Operand",
    "TetrisOptions",
    "TetrisResult",
    "tetris",
    "tetris_weight",
]

log = logging.getLogger(__name__)

Method = Literal["faithful", "assignment"]
Init = Literal["identity", "norm", "profile", "cluster", "grow", "auto", "multi"]
_GROW_LIMIT = 2048  # most kept blocks the greedy growth init is tried for (its cost grows with them)


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
class TetrisOptions:
    """How to search. Defaults are the authors' algorithm; see the module docstring for each option."""

    method: Method = "faithful"
    init: Init = "identity"
    restarts: int = 0
    perturb: float = 0.15
    anneal: tuple[float, ...] = ()
    final_e_step: bool = False
    tol: float = 1e-5
    rtol: float = 0.0
    max_iters: int = 100
    skip_unit_blocks: bool = False
    refine: int = 0
    refine_batch: int = 64
    refine_temperature: float = 0.1
    pad: bool = False
    seed: int = 0


FAITHFUL = TetrisOptions()
BEST = TetrisOptions(init="multi", restarts=2, final_e_step=True, skip_unit_blocks=True)
FAST = TetrisOptions(init="auto", final_e_step=True, skip_unit_blocks=True)


@dataclass(frozen=True, eq=False)
class TetrisResult:
    """Orders and masks.

    ``orders[v]``: int64 tensor; new index i holds old index ``orders[v][i]`` (as
    :class:`~tilefx.passes.metadata.Permutation`). ``keep[k]``: bool, operand k's shape, True = kept,
    in the *original* coordinates. ``block_keep[k]``: bool block grid in the *permuted* coordinates
    (what :class:`~tilefx.passes.metadata.BlockSparsity` holds once the orders are folded).
    ``history``: total pruned L1 after every E-step and every M-step (non-increasing).
    """

    orders: Mapping[Hashable, torch.Tensor]
    keep: tuple[torch.Tensor, ...]
    block_keep: tuple[torch.Tensor, ...]
    history: tuple[float, ...]
    total_l1: float
    seconds: float = 0.0
    iterations: int = 0

    @property
    def pruned_l1(self) -> float:
        return self.history[-1] if self.history else 0.0

    @property
    def kept_fraction(self) -> float:
        """Fraction of the total L1 magnitude (all operands) that the keep-masks keep."""
        return 1.0 - self.pruned_l1 / self.total_l1 if self.total_l1 > 0 else 1.0


def tetris_weight(
    weight: torch.Tensor, block: Sequence[int], sparsity: float, options: TetrisOptions = FAITHFUL
) -> TetrisResult:
    """The authors' single-tensor problem: every axis that a block does not span gets its own order.

    ``block`` may be shorter than ``weight.dim()``; missing trailing axes are whole (0), so a conv's
    ``(b_out, b_in)`` spans the kernel. Variables are the axis numbers ``0, 1, ...``. With
    ``options.skip_unit_blocks`` an axis of block size 1 gets no variable either: permuting it cannot
    change the best mask's objective (every slice is its own block), only the EM trajectory.
    """
    full = tuple(block) + (0,) * (weight.dim() - len(block))
    skipped = (0, 1) if options.skip_unit_blocks else (0,)
    variables = tuple(
        d if b not in (*skipped, n) else None for d, (n, b) in enumerate(zip(weight.shape, full, strict=True))
    )
    return tetris([Operand(weight, variables, full)], sparsity, options)


def tetris(
    operands: Sequence[Operand],
    sparsity: float,
    options: TetrisOptions = FAITHFUL,
    initial: Mapping[Hashable, torch.Tensor] | None = None,
) -> TetrisResult:
    """Jointly reorder and block-prune ``operands``; see the module docstring for the contract.

    ``initial`` optionally warm-starts some variables' orders (it overrides ``options.init`` for them).
    """
    start = time.perf_counter()
    problem = _Problem.build(operands, sparsity, options)
    rng = np.random.default_rng(options.seed)
    inits: tuple[Init, ...] = ("identity", "cluster", "grow") if options.init == "multi" else (options.init,)
    best: _State | None = None
    for init in inits:
        if len(inits) > 1 and init == "grow" and problem.grow_orders() is None:
            continue  # would repeat "profile"
        state = problem.initial_state(init, initial or {})
        for warm in options.anneal:
            state = problem.em(state, problem.with_sparsity(warm), options)
        state = problem.em(state, problem.rates, options)
        if best is None or state.objective < best.objective - options.tol:
            best = state
    assert best is not None
    for _ in range(options.restarts):
        trial = problem.em(problem.perturbed(best, options.perturb, rng), problem.rates, options)
        winner = trial if trial.objective < best.objective - options.tol else best
        # The history stays the best trajectory: one entry per restart, the best objective so far.
        best = replace(
            winner, history=best.history + (winner.objective,), iterations=best.iterations + trial.iterations
        )
    if options.refine:
        best = problem.refine(best, options)
    return problem.result(best, time.perf_counter() - start)


@dataclass(frozen=True)
class _Plane:
    variables: tuple[Hashable | None, Hashable | None]  # row, column variable (None = fixed axis)
    a: np.ndarray  # magnitude summed over the whole-block axes
    block: tuple[int, int]
    keep: int  # blocks kept


@dataclass(frozen=True)
class _Use:
    operand: int
    axis: int
    offset: int = 0  # first position of the variable's segment on this axis (Concat)


@dataclass(frozen=True)
class _State:
    orders: dict[Hashable, np.ndarray]
    grids: tuple[np.ndarray, ...]  # per operand: bool keep-mask over the block grid (permuted coords)
    objective: float
    history: tuple[float, ...] = ()
    iterations: int = 0


@dataclass
class _Problem:
    magnitudes: list[np.ndarray]  # |W|, zero-padded to whole blocks, float64, original coordinates
    sizes: list[tuple[int, ...]]  # resolved block sizes per operand
    rates: tuple[float, ...]  # per-operand sparsity
    uses: dict[Hashable, list[_Use]]  # variable -> its (operand, axis) pairs, in first-appearance order
    lengths: dict[Hashable, int]  # variable -> real (unpadded) axis length
    shapes: list[tuple[int, ...]]  # original (unpadded) shapes
    seed: int = 0

    @classmethod
    def build(cls, operands: Sequence[Operand], sparsity: float, options: TetrisOptions) -> _Problem:
        _check_options(options)
        check_sparsity(sparsity)
        if not operands:
            raise RecipeError("tetris needs at least one operand")
        magnitudes, sizes, rates, shapes = [], [], [], []
        uses: dict[Hashable, list[_Use]] = {}
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
            grid = block_grid(shape, op.block, pad=options.pad)
            for axis, spec in enumerate(op.variables):
                for var, offset, length in _segments(spec, shape[axis], f"{op.name} axis {axis}"):
                    if lengths.setdefault(var, length) != length:
                        raise RecipeError(
                            f"permutation variable {var!r} has length {lengths[var]} elsewhere but "
                            f"{op.name} axis {axis} gives it length {length}"
                        )
                    uses.setdefault(var, []).append(_Use(k, axis, offset))
            magnitudes.append(pad_to_blocks(magnitude, grid))
            sizes.append(grid)
            rates.append(float(rate))
            shapes.append(shape)
        return cls(magnitudes, sizes, tuple(rates), uses, lengths, shapes, options.seed)

    def with_sparsity(self, sparsity: float) -> tuple[float, ...]:
        return tuple(sparsity for _ in self.rates)

    # ----- state helpers -------------------------------------------------------------------------
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

    def segment(self, use: _Use, n: int) -> np.ndarray:
        """The ``n`` slices of ``use``'s operand that its variable's segment covers (original order)."""
        return np.take(self.magnitudes[use.operand], np.arange(use.offset, use.offset + n), axis=use.axis)

    def e_step(self, orders: dict[Hashable, np.ndarray], rates: Sequence[float]) -> _State:
        grids, objective = [], 0.0
        for k in range(len(self.magnitudes)):
            sums = block_sums(self.permuted(k, orders), self.sizes[k])
            keep = lowest_blocks(sums, rates[k])
            grids.append(keep)
            objective += float(sums[~keep].sum())
        return _State(dict(orders), tuple(grids), objective)

    def objective(self, orders: Mapping[Hashable, np.ndarray], grids: Sequence[np.ndarray]) -> float:
        return sum(
            float(block_sums(self.permuted(k, orders), self.sizes[k])[~grids[k]].sum())
            for k in range(len(self.magnitudes))
        )

    def initial_state(self, init: Init, initial: Mapping[Hashable, torch.Tensor]) -> _State:
        grown = self.grow_orders() if init in ("grow", "auto") else None
        orders = grown or {v: self._initial_order(v, init) for v in self.uses}
        for var, order in initial.items():
            given = np.asarray(torch.as_tensor(order).cpu(), dtype=np.int64)
            if var not in orders or sorted(given.tolist()) != list(range(self.lengths[var])):
                raise RecipeError(f"initial order for {var!r} is not a bijection of a known variable")
            orders[var] = given
        return _State(orders, (), float("inf"))

    def _initial_order(self, var: Hashable, init: Init) -> np.ndarray:
        n = self.lengths[var]
        if init == "norm":
            return norm_order([(self.segment(u, n), u.axis) for u in self.uses[var]], n)
        if init in ("cluster", "auto"):  # auto: grow where it applies, else cluster
            use = self.uses[var][0]
            return cluster_order(
                [(self.segment(u, n), u.axis, self.sizes[u.operand]) for u in self.uses[var]],
                n,
                self.sizes[use.operand][use.axis],
                self.seed,
            )
        if init in ("profile", "grow"):  # grow falls back to profile where it does not apply
            return profile_order(
                [(self.segment(u, n), u.axis, self.sizes[u.operand]) for u in self.uses[var]], n
            )
        return np.arange(n)

    def plane(self) -> _Plane | None:
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
        return _Plane(
            (by_axis.get(axes[0]), by_axis.get(axes[1])),
            magnitude.sum(axis=others) if others else magnitude,
            (sizes[axes[0]], sizes[axes[1]]),
            blocks - num_pruned_blocks(blocks, self.rates[0]),
        )

    def grow_orders(self) -> dict[Hashable, np.ndarray] | None:
        """Greedy growth (tetris_init.grow_orders) for a 2-d problem with a variable on both axes."""
        plane = self.plane()
        if plane is None or None in plane.variables or not 0 < plane.keep <= _GROW_LIMIT:
            return None
        row_var, col_var = plane.variables
        rows, cols = grow_orders(plane.a, *plane.block, plane.keep)
        return {row_var: rows[rows < self.lengths[row_var]], col_var: cols[cols < self.lengths[col_var]]}

    def refine(self, state: _State, options: TetrisOptions) -> _State:
        """True-objective search (tetris_refine) from ``state``; EM's state where it does not apply."""
        plane = self.plane()
        if plane is None:
            return state
        given = tuple(np.arange(0) if v is None else state.orders[v] for v in plane.variables)
        movable = tuple(0 if v is None else self.lengths[v] for v in plane.variables)
        found = refine_orders(
            plane.a,
            plane.block,
            plane.keep,
            (given[0], given[1]),
            (movable[0], movable[1]),
            steps=options.refine,
            batch=options.refine_batch,
            temperature=options.refine_temperature,
            seed=options.seed,
        )
        orders = dict(state.orders)
        for var, order in zip(plane.variables, found, strict=True):
            if var is not None:
                orders[var] = order[: self.lengths[var]]
        refined = self.e_step(orders, self.rates)
        if refined.objective >= state.objective:
            return state
        return replace(refined, history=state.history + (refined.objective,), iterations=state.iterations)

    def perturbed(self, state: _State, fraction: float, rng: np.random.Generator) -> _State:
        orders = {}
        for var, order in state.orders.items():
            order = order.copy()
            count = max(2, int(round(fraction * len(order))))
            picked = rng.choice(len(order), size=min(count, len(order)), replace=False)
            order[picked] = order[rng.permutation(picked)]
            orders[var] = order
        return _State(orders, (), float("inf"))

    # ----- EM ------------------------------------------------------------------------------------
    def em(self, state: _State, rates: Sequence[float], options: TetrisOptions) -> _State:
        orders = dict(state.orders)
        history: list[float] = []
        iterations = 0
        current = self.e_step(orders, rates)
        while True:
            iterations += 1
            history.append(current.objective)
            prev = current.objective
            grids = current.grids
            value = prev
            for var in self.uses:
                value, orders = self.m_step(var, orders, grids, value, options)
                history.append(value)
            if prev - value < max(options.tol, options.rtol * prev) or iterations >= options.max_iters:
                break
            current = self.e_step(orders, rates)
        final = _State(orders, grids, value, tuple(history), iterations)
        if options.final_e_step:
            refreshed = self.e_step(orders, rates)
            if refreshed.objective <= value:
                final = replace(
                    refreshed, history=final.history + (refreshed.objective,), iterations=iterations
                )
        return final

    def m_step(
        self,
        var: Hashable,
        orders: dict[Hashable, np.ndarray],
        grids: Sequence[np.ndarray],
        value: float,
        options: TetrisOptions,
    ) -> tuple[float, dict[Hashable, np.ndarray]]:
        n = self.lengths[var]
        cost = np.zeros((n, n))
        for use in self.uses[var]:
            cost += self._swap_cost(use, orders, grids[use.operand], n)
        relative = (
            _greedy_swaps(cost, options.tol)
            if options.method == "faithful"
            else _assignment(cost, options.tol)
        )
        if np.array_equal(relative, np.arange(n)):
            return value, orders
        moved = {**orders, var: orders[var][relative]}
        new_value = self.objective(moved, grids)
        if new_value > value:  # only possible when a variable labels two axes of one operand
            return value, orders
        return new_value, moved

    def _swap_cost(
        self, use: _Use, orders: Mapping[Hashable, np.ndarray], grid: np.ndarray, n: int
    ) -> np.ndarray:
        """``S[i, j]``: this use's pruned magnitude if current slice i is put at position j."""
        sizes = self.sizes[use.operand]
        permuted = self.permuted(use.operand, orders)
        # Sum within blocks along every other axis, then contract with the block mask: T[i, r].
        others = [b if a != use.axis else 1 for a, b in enumerate(sizes)]
        reduced = block_sums(permuted, others)
        pruned = (~grid).astype(np.float64)
        table = np.moveaxis(reduced, use.axis, 0).reshape(reduced.shape[use.axis], -1) @ (
            np.moveaxis(pruned, use.axis, 0).reshape(pruned.shape[use.axis], -1).T
        )
        positions = use.offset + np.arange(n)
        return table[positions][:, positions // sizes[use.axis]]

    def result(self, state: _State, seconds: float) -> TetrisResult:
        keep, block_keep = [], []
        for k, shape in enumerate(self.shapes):
            element = expand_blocks(state.grids[k], self.sizes[k])
            for axis, index in self.axis_orders(k, state.orders).items():
                element = _unpermute(element, index, axis)
            keep.append(torch.from_numpy(np.ascontiguousarray(element[tuple(slice(0, n) for n in shape)])))
            block_keep.append(torch.from_numpy(state.grids[k].copy()))
        orders = {v: torch.from_numpy(o.astype(np.int64)) for v, o in state.orders.items()}
        total = float(sum(m.sum() for m in self.magnitudes))
        log.debug(
            "tetris: kept %.4f of L1 in %d rounds, %.2fs",
            1 - state.objective / max(total, 1e-300),
            state.iterations,
            seconds,
        )
        return TetrisResult(
            orders, tuple(keep), tuple(block_keep), state.history, total, seconds, state.iterations
        )


# ----- M-step solvers ------------------------------------------------------------------------------
def _greedy_swaps(cost: np.ndarray, tol: float) -> np.ndarray:
    """The authors' greedy: repeatedly swap the pair with the largest gain while it is ≥ tol.

    Returns the relative order (new position p holds current slice ``order[p]``).
    """
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


def _assignment(cost: np.ndarray, tol: float) -> np.ndarray:
    """Exact M-step (extension): the permutation minimising ``Σ_i cost[i, π(i)]``."""
    rows, cols = linear_sum_assignment(cost)
    if np.trace(cost) - cost[rows, cols].sum() < tol:
        return np.arange(len(cost))
    order = np.empty(len(cost), dtype=np.int64)
    order[cols] = rows
    return order


# ----- small helpers -------------------------------------------------------------------------------
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


def _unpermute(array: np.ndarray, order: np.ndarray, axis: int) -> np.ndarray:
    out = np.empty_like(array)
    index: list[slice | np.ndarray] = [slice(None)] * array.ndim
    index[axis] = order
    out[tuple(index)] = array
    return out


def _check_options(options: TetrisOptions) -> None:
    if options.method not in ("faithful", "assignment"):
        raise RecipeError(f"TetrisOptions.method must be 'faithful' or 'assignment', got {options.method!r}")
    if options.init not in ("identity", "norm", "profile", "cluster", "grow", "auto", "multi"):
        raise RecipeError(
            f"TetrisOptions.init must be one of identity/norm/profile/cluster/grow/auto/multi, got {options.init!r}"
        )
    if options.restarts < 0 or options.max_iters < 1 or not 0 < options.perturb <= 1:
        raise RecipeError(f"TetrisOptions out of range: {options}")
    for s in options.anneal:
        check_sparsity(s, "TetrisOptions.anneal entry")
