"""TETRIS (Ji et al., NeurIPS 2018): reorder tensor axes so that small weights fill whole blocks.

A pure function over tensors (no fx; docs/methods.md, TETRIS). :func:`tetris` states the problem
(:mod:`.tetris_problem`: operands whose axes carry shared permutation variables), picks starting
orders (:mod:`.tetris_init`), runs the authors' EM from each (:mod:`.tetris_em`) and returns the
best orders with the block masks they give. :func:`tetris_weight` is the authors' single-tensor
problem. :class:`TetrisOptions` says how to search; the presets are what
``BlockPruning(tetris=...)`` selects:

- :data:`FAITHFUL`: the authors' algorithm (identity start, greedy max-gain swaps): for a single
  operand whose every non-whole axis has its own variable, the defaults reproduce their code;
- :data:`FAST`: one EM run from ``init="auto"`` (greedy growth for 2-d problems, balanced k-means
  elsewhere), a final E-step, no variable for block size 1;
- :data:`BEST`: the best of EM from the identity, k-means and growth starts, then two perturbation
  restarts (iterated local search: a random ``perturb`` fraction of each variable's positions
  reshuffled, EM re-run, the result kept if the objective fell); the combination measured best on
  MiniLM (benchmarks/tetris_quality.py);
- :data:`SKETCH`: :data:`FAST` with the k-means of the cluster start on a 64-wide random
  projection of the profiles (``sketch_dims``): an approximation, so other orders than FAST's, for
  wide layers whose k-means dominates (BERT-base's 3072-wide FFN groups; benchmarks/tetris_time.py).

Errors: :class:`RecipeError` (a ``ValueError``) for sparsity outside ``[0, 1)``, a block that does
not tile an axis (unless ``pad=True``), mismatched variable sizes, malformed operands or options;
:class:`WeightError` (a ``ValueError``) for NaN/inf weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from tilefx.options import option, options

from .block_selection import expand_blocks
from .tetris_em import MStep, State, em, greedy_swaps
from .tetris_grow import grown_orders
from .tetris_init import Start, initial_orders, warm_started
from .tetris_problem import Concat, Operand, Problem

__all__ = [
    "BEST",
    "FAITHFUL",
    "FAST",
    "PRESETS",
    "SKETCH",
    "TetrisPreset",
    "Concat",
    "Operand",
    "TetrisOptions",
    "TetrisResult",
    "search",
    "tetris",
    "tetris_result",
    "tetris_weight",
    "weight_operand",
]

log = logging.getLogger(__name__)

Init = Literal[Start, "multi"]


@options
class TetrisOptions:
    """How to search. Defaults are the authors' algorithm.

    ``init``: the starting orders (:mod:`.tetris_init`), or ``"multi"``: EM from "identity",
    "cluster" and "grow" (where it applies), keeping the best. ``restarts``: perturbation restarts
    of the best result, each reshuffling a ``perturb`` fraction of every variable's positions.
    ``sketch_dims``: k-means of the cluster start on a seeded random projection of the slice
    profiles to this many dimensions (0: on the profiles themselves; approximate, see
    :func:`~.tetris_init.sketched_centres`).
    ``final_e_step``: one more E-step after convergence. ``tol``, ``max_iters``: EM stops when a
    round gains less than ``tol`` or after ``max_iters`` rounds. ``skip_unit_blocks``
    (:func:`tetris_weight` only): no variable for an axis of block size 1 (permuting it cannot
    change the best mask's objective, only the EM trajectory). ``pad``: zero-pad an axis the block
    does not tile. ``seed``: for k-means and restarts.
    """

    init: Init = "identity"
    restarts: int = option(default=0, ge=0)
    perturb: float = option(default=0.15, gt=0, le=1)
    final_e_step: bool = False
    tol: float = option(default=1e-5, ge=0)
    max_iters: int = option(default=100, ge=1)
    skip_unit_blocks: bool = False
    pad: bool = False
    seed: int = 0
    sketch_dims: int = option(default=0, ge=0)


FAITHFUL = TetrisOptions()
BEST = TetrisOptions(init="multi", restarts=2, final_e_step=True, skip_unit_blocks=True)
FAST = TetrisOptions(init="auto", final_e_step=True, skip_unit_blocks=True)
SKETCH = replace(FAST, sketch_dims=64)

TetrisPreset = Literal["faithful", "fast", "best", "sketch"]
#: The presets ``tilefx.BlockPruning(tetris=...)`` names.
PRESETS: dict[str, TetrisOptions] = {"faithful": FAITHFUL, "fast": FAST, "best": BEST, "sketch": SKETCH}


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


def weight_operand(weight: torch.Tensor, block: Sequence[int], skip_unit_blocks: bool = False) -> Operand:
    """The authors' single-tensor problem: every axis that a block does not span gets its own order.

    ``block`` may be shorter than ``weight.dim()``; missing trailing axes are whole (0), so a conv's
    ``(b_out, b_in)`` spans the kernel. Variables are the axis numbers ``0, 1, ...``; with
    ``skip_unit_blocks`` an axis of block size 1 gets no variable either.
    """
    full = tuple(block) + (0,) * (weight.dim() - len(block))
    skipped = (0, 1) if skip_unit_blocks else (0,)
    variables = tuple(
        d if b not in (*skipped, n) else None for d, (n, b) in enumerate(zip(weight.shape, full, strict=True))
    )
    return Operand(weight, variables, full)


def tetris_weight(
    weight: torch.Tensor, block: Sequence[int], sparsity: float, options: TetrisOptions = FAITHFUL
) -> TetrisResult:
    """Reorder and block-prune one weight (:func:`weight_operand`)."""
    return tetris([weight_operand(weight, block, options.skip_unit_blocks)], sparsity, options)


def tetris(
    operands: Sequence[Operand],
    sparsity: float,
    options: TetrisOptions = FAITHFUL,
    initial: Mapping[Hashable, torch.Tensor] | None = None,
    *,
    progress: bool = False,
) -> TetrisResult:
    """Jointly reorder and block-prune ``operands`` (:mod:`.tetris_problem` states the contract).

    ``initial`` optionally warm-starts some variables' orders (it overrides ``options.init`` for them).
    ``progress``: draw tqdm bars (see :func:`search`).

    numpy's BLAS runs on one thread meanwhile: the search's products are narrow (k-means against
    a few candidates, one row of blocks at a time), so a second thread mostly waits for the first;
    on two shared cores that tripled the CPU time of BERT-base's search. OpenBLAS splits a
    product's output between threads, not its sums, so the numbers do not change (BERT-base and
    MiniLM get the same orders and masks either way: benchmarks/tetris_time.py).
    """
    start = time.perf_counter()
    problem = Problem.build(operands, sparsity, pad=options.pad)
    with threadpool_limits(limits=1, user_api="blas"):
        state = search(problem, options, initial, progress=progress)
    return tetris_result(problem, state, time.perf_counter() - start)


def search(
    problem: Problem,
    options: TetrisOptions,
    initial: Mapping[Hashable, torch.Tensor] | None = None,
    m_step: MStep = greedy_swaps,
    *,
    progress: bool = False,
) -> State:
    """EM from every start, then the restarts: the best state found.

    ``m_step`` replaces the authors' M-step solver (benchmarks/tetris_experiments.py tries an exact one).
    ``progress``: draw two tqdm bars on stderr, the starting orders (one step per permutation
    variable) and the EM rounds (all runs together, with the pruned L1 so far). The caller decides
    (``show_progress`` in tilefx/passes/training/loop.py: asked for and stderr is a terminal).
    """
    starts = _starts(problem, options, progress)
    with tqdm(desc="TETRIS EM", unit=" rounds", disable=not progress, dynamic_ncols=True) as bar:

        def on_round(iterations: int, objective: float) -> None:
            bar.update(1)
            bar.set_postfix(pruned_l1=f"{objective:.6g}", refresh=False)

        run = partial(
            em,
            problem,
            tol=options.tol,
            max_iters=options.max_iters,
            final_e_step=options.final_e_step,
            m_step=m_step,
            on_round=on_round,
        )
        best: State | None = None
        for orders in starts:
            state = run(warm_started(problem, orders, initial or {}))
            if best is None or state.objective < best.objective - options.tol:
                best = state
        assert best is not None
        rng = np.random.default_rng(options.seed)
        for _ in range(options.restarts):
            trial = run(_perturbed(best.orders, options.perturb, rng))
            winner = trial if trial.objective < best.objective - options.tol else best
            # The history stays the best trajectory: one entry per restart, the best objective so far.
            best = replace(
                winner,
                history=best.history + (winner.objective,),
                iterations=best.iterations + trial.iterations,
            )
    return best


def tetris_result(problem: Problem, state: State, seconds: float) -> TetrisResult:
    """``state`` as tensors, the masks mapped back to the original coordinates."""
    keep, block_keep = [], []
    for k, shape in enumerate(problem.shapes):
        element = expand_blocks(state.grids[k], problem.sizes[k])
        for axis, index in problem.axis_orders(k, state.orders).items():
            element = _unpermute(element, index, axis)
        keep.append(torch.from_numpy(np.ascontiguousarray(element[tuple(slice(0, n) for n in shape)])))
        block_keep.append(torch.from_numpy(state.grids[k].copy()))
    orders = {v: torch.from_numpy(o.astype(np.int64)) for v, o in state.orders.items()}
    total = float(sum(m.sum() for m in problem.magnitudes))
    log.debug(
        "tetris: kept %.4f of L1 in %d rounds, %.2fs",
        1 - state.objective / max(total, 1e-300),
        state.iterations,
        seconds,
    )
    return TetrisResult(
        orders, tuple(keep), tuple(block_keep), state.history, total, seconds, state.iterations
    )


def _starts(problem: Problem, options: TetrisOptions, progress: bool) -> list[dict[Hashable, np.ndarray]]:
    """The orders EM starts from: one, or for ``init="multi"`` identity, cluster and grow."""
    kinds = 3 if options.init == "multi" else 1
    total = kinds * len(problem.uses)
    with tqdm(
        total=total, desc="TETRIS starts", unit=" groups", disable=not progress, dynamic_ncols=True
    ) as bar:
        sketch = options.sketch_dims
        if options.init != "multi":
            return [initial_orders(problem, options.init, options.seed, bar.update, sketch)]
        starts = [
            initial_orders(problem, start, options.seed, bar.update, sketch)
            for start in ("identity", "cluster")
        ]
        grown = grown_orders(problem)  # where growth does not apply it would repeat "profile"
        bar.update(len(problem.uses))
    return starts if grown is None else [*starts, grown]


def _perturbed(
    orders: Mapping[Hashable, np.ndarray], fraction: float, rng: np.random.Generator
) -> dict[Hashable, np.ndarray]:
    """Each order with a random ``fraction`` (at least two) of its positions reshuffled."""
    out = {}
    for var, order in orders.items():
        order = order.copy()
        count = max(2, int(round(fraction * len(order))))
        picked = rng.choice(len(order), size=min(count, len(order)), replace=False)
        order[picked] = order[rng.permutation(picked)]
        out[var] = order
    return out


def _unpermute(array: np.ndarray, order: np.ndarray, axis: int) -> np.ndarray:
    out = np.empty_like(array)
    index: list[slice | np.ndarray] = [slice(None)] * array.ndim
    index[axis] = order
    out[tuple(index)] = array
    return out
