"""TETRIS EM: monotone objective, bijective orders, shared variables, exact counts, typed errors.

The experiments in benchmarks/tetris_experiments.py (exact M-step, true-objective refinement) are
held to the same contract here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch

from benchmarks.tetris_experiments import (
    _after_swap,
    assignment_tetris,
    assignment_weight,
    kept_sum,
    refined_tetris,
    refined_weight,
)
from tilefx.errors import RecipeError, WeightError
from tilefx.passes.analysis.block_selection import block_sums, lowest_blocks
from tilefx.passes.analysis.tetris import (
    BEST,
    FAITHFUL,
    FAST,
    SKETCH,
    Concat,
    Operand,
    TetrisOptions,
    TetrisResult,
    tetris,
    tetris_weight,
)
from tilefx.passes.analysis.tetris_planner import _identity_pruned_l1

Method = Callable[[torch.Tensor, tuple[int, int], float], TetrisResult]
METHODS: list[Method] = [
    partial(tetris_weight, options=FAITHFUL),
    assignment_weight,
    partial(tetris_weight, options=BEST),
]


def _structured(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Weights whose magnitude has row/column structure hidden by a random shuffle."""
    g = torch.Generator().manual_seed(seed)
    w = (
        torch.randn(rows, cols, generator=g)
        * torch.rand(rows, 1, generator=g)
        * torch.rand(1, cols, generator=g)
    )
    return w[torch.randperm(rows, generator=g)][:, torch.randperm(cols, generator=g)]


def _naive_kept(w: torch.Tensor, block: tuple[int, ...], sparsity: float) -> float:
    a = w.abs().double().numpy()
    sums = block_sums(a, block)
    return 1.0 - float(sums[~lowest_blocks(sums, sparsity)].sum()) / float(a.sum())


def _is_bijection(order: torch.Tensor, n: int) -> bool:
    return sorted(order.tolist()) == list(range(n))


@pytest.mark.parametrize("method", METHODS, ids=["faithful", "assignment", "best"])
@pytest.mark.parametrize("block", [(8, 8), (16, 1), (1, 16)])
def test_objective_never_increases_and_beats_naive(method: Method, block: tuple[int, int]) -> None:
    w = _structured(64, 96)
    result = method(w, block, 0.7)
    history = np.asarray(result.history)
    assert (np.diff(history) <= 1e-9 * history[0]).all(), history
    assert result.kept_fraction >= _naive_kept(w, block, 0.7) - 1e-12
    for axis, order in result.orders.items():
        assert _is_bijection(order, w.shape[axis])


@pytest.mark.parametrize("method", METHODS, ids=["faithful", "assignment", "best"])
def test_masks_agree_and_hit_the_block_count(method: Method) -> None:
    w = _structured(64, 96, seed=1)
    result = method(w, (8, 8), 0.8)
    rows, cols = result.orders[0], result.orders[1]
    grid = result.block_keep[0]
    assert grid.shape == (8, 12)
    assert int((~grid).sum()) == int(0.8 * 96)  # floor(rate · #blocks), the authors' count
    in_permuted = grid.repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert torch.equal(result.keep[0][rows][:, cols], in_permuted)
    kept = float((w.abs().double() * result.keep[0]).sum() / w.abs().double().sum())
    assert kept == pytest.approx(result.kept_fraction, rel=1e-9)


def test_faithful_is_deterministic_and_seeded_extensions_repeat() -> None:
    w = _structured(48, 48, seed=2)
    for options in (FAITHFUL, BEST):
        a, b = tetris_weight(w, (8, 8), 0.6, options), tetris_weight(w, (8, 8), 0.6, options)
        assert all(torch.equal(a.orders[k], b.orders[k]) for k in a.orders)
        assert torch.equal(a.keep[0], b.keep[0])


def test_conv_blocks_span_the_kernel_and_kernel_axes_are_fixed() -> None:
    w = torch.randn(32, 16, 3, 3)
    result = tetris_weight(w, (8, 4), 0.5)
    assert set(result.orders) == {0, 1}
    assert result.block_keep[0].shape == (4, 4, 1, 1)
    keep = result.keep[0]
    assert bool((keep == keep[:, :, :1, :1]).all())  # whole kernels kept or dropped


def test_shared_variable_gets_one_order_and_couples_both_operands() -> None:
    w1, w2 = _structured(64, 32, seed=3), _structured(48, 64, seed=4)  # W2 consumes W1's outputs
    ops = [Operand(w1, ("h", None), (8, 0)), Operand(w2, (None, "h"), (0, 8))]
    result = assignment_tetris(ops, 0.5)
    assert set(result.orders) == {"h"} and _is_bijection(result.orders["h"], 64)
    order = result.orders["h"]
    assert torch.equal(result.keep[0][order], result.block_keep[0].repeat_interleave(8, 0).expand(64, 32))
    assert torch.equal(result.keep[1][:, order], result.block_keep[1].repeat_interleave(8, 1).expand(48, 64))
    history = np.asarray(result.history)
    assert (np.diff(history) <= 1e-9 * history[0]).all()


def test_variable_on_two_axes_of_one_operand_stays_monotone() -> None:
    w = _structured(48, 48, seed=5)
    result = tetris([Operand(w, ("v", "v"), (8, 8))], 0.6)
    history = np.asarray(result.history)
    assert (np.diff(history) <= 1e-9 * history[0]).all()
    assert _is_bijection(result.orders["v"], 48)


def test_per_operand_sparsity() -> None:
    ops = [
        Operand(torch.randn(32, 32), (0, 1), (8, 8), sparsity=0.25),
        Operand(torch.randn(32, 32), (2, 3), (8, 8)),
    ]
    result = tetris(ops, 0.75)
    assert [int((~g).sum()) for g in result.block_keep] == [4, 12]


def test_padding_keeps_the_real_axis_a_bijection() -> None:
    w = torch.randn(30, 20)
    with pytest.raises(RecipeError, match="does not tile"):
        tetris_weight(w, (8, 8), 0.5)
    result = tetris_weight(w, (8, 8), 0.5, TetrisOptions(pad=True))
    assert _is_bijection(result.orders[0], 30) and _is_bijection(result.orders[1], 20)
    assert result.keep[0].shape == (30, 20)
    assert result.block_keep[0].shape == (4, 3)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_out_of_range_is_rejected(sparsity: float) -> None:
    with pytest.raises(RecipeError, match=r"\[0, 1\)"):
        tetris_weight(torch.randn(16, 16), (4, 4), sparsity)


def test_nan_weights_are_rejected() -> None:
    w = torch.randn(16, 16)
    w[3, 4] = float("nan")
    with pytest.raises(WeightError, match="NaN"):
        tetris_weight(w, (4, 4), 0.5)
    assert issubclass(WeightError, ValueError)


def test_mismatched_shared_variable_lengths_are_rejected() -> None:
    ops = [Operand(torch.randn(16, 8), ("a", None), (4, 0)), Operand(torch.randn(8, 12), (None, "a"), (0, 4))]
    with pytest.raises(RecipeError, match="length"):
        tetris(ops, 0.5)


def test_zero_sparsity_keeps_everything() -> None:
    result = tetris_weight(torch.randn(16, 16), (4, 4), 0.0)
    assert bool(result.keep[0].all()) and result.kept_fraction == 1.0


@pytest.mark.parametrize("init", ["norm", "profile", "cluster", "grow", "auto", "multi"])
def test_extension_inits_are_monotone_bijective_and_beat_naive(init: str) -> None:
    w = _structured(64, 96, seed=6)
    options = TetrisOptions(init=init, restarts=1)  # type: ignore[arg-type]
    result = tetris_weight(w, (8, 8), 0.75, options)
    history = np.asarray(result.history)
    assert (np.diff(history) <= 1e-9 * history[0]).all()
    assert result.kept_fraction >= _naive_kept(w, (8, 8), 0.75) - 1e-12
    assert _is_bijection(result.orders[0], 64) and _is_bijection(result.orders[1], 96)


def test_warm_start_must_be_a_bijection() -> None:
    w = torch.randn(16, 16)
    good = tetris_weight(w, (4, 4), 0.5)
    again = tetris([Operand(w, (0, 1), (4, 4))], 0.5, FAITHFUL, good.orders)
    assert again.kept_fraction >= good.kept_fraction - 1e-12
    with pytest.raises(RecipeError, match="bijection"):
        tetris([Operand(w, (0, 1), (4, 4))], 0.5, FAITHFUL, {0: torch.zeros(16, dtype=torch.long)})


def test_concat_axis_is_permuted_block_diagonally() -> None:
    a, b = _structured(32, 16, seed=7), _structured(48, 16, seed=8)  # two producers, cat along channels
    consumer = _structured(24, 80, seed=9)  # reads cat([a_out, b_out]): 32 + 48 inputs
    ops = [
        Operand(a, ("a", None), (8, 0)),
        Operand(b, ("b", None), (8, 0)),
        Operand(consumer, (None, Concat((("a", 32), ("b", 48)))), (0, 8)),
    ]
    result = tetris(ops, 0.5, TetrisOptions(init="norm"))
    oa, ob = result.orders["a"], result.orders["b"]
    assert _is_bijection(oa, 32) and _is_bijection(ob, 48)
    full = torch.cat([oa, 32 + ob])
    expected = result.block_keep[2].repeat_interleave(8, 1).expand(24, 80)
    assert torch.equal(result.keep[2][:, full], expected)
    assert torch.equal(result.keep[0][oa], result.block_keep[0].repeat_interleave(8, 0).expand(32, 16))
    history = np.asarray(result.history)
    assert (np.diff(history) <= 1e-9 * history[0]).all()
    with pytest.raises(RecipeError, match="add up"):
        tetris([Operand(consumer, (None, Concat((("a", 32), ("b", 40)))), (0, 8))], 0.5)


def test_sketch_preset_is_a_valid_repeatable_start_and_full_width_sketch_is_fast() -> None:
    w1, w2 = _structured(256, 96, seed=14), _structured(96, 256, seed=15)  # an FFN pair: one shared order
    ops = [Operand(w1, ("f", None), (16, 1)), Operand(w2, (None, "f"), (16, 1))]
    a, b = tetris(ops, 0.8, SKETCH), tetris(ops, 0.8, SKETCH)
    assert torch.equal(a.orders["f"], b.orders["f"]) and a.history == b.history
    assert _is_bijection(a.orders["f"], 256)
    history = np.asarray(a.history)
    assert (np.diff(history) <= 1e-9 * history[0]).all()
    assert a.kept_fraction > 1 - _identity_pruned_l1(ops, 0.8) / a.total_l1  # beats no reordering
    wide = tetris(ops, 0.8, replace(SKETCH, sketch_dims=10_000))  # no narrower than the profiles: no sketch
    fast = tetris(ops, 0.8, FAST)
    assert torch.equal(wide.orders["f"], fast.orders["f"]) and wide.history == fast.history
    assert not torch.equal(a.orders["f"], fast.orders["f"])  # the sketch does change the start


REFINE_STEPS = 300


@pytest.mark.parametrize("block", [(8, 8), (16, 1), (4, 16)])
def test_refine_never_loses_to_its_warm_start_and_keeps_bijections(block: tuple[int, int]) -> None:
    w = _structured(64, 96, seed=10)
    warm, refined = tetris_weight(w, block, 0.8, FAST), refined_weight(w, block, 0.8, steps=REFINE_STEPS)
    assert refined.kept_fraction >= warm.kept_fraction - 1e-12
    history = np.asarray(refined.history)
    assert (np.diff(history) <= 1e-9 * history[0]).all()
    for axis, order in refined.orders.items():
        assert _is_bijection(order, w.shape[axis])
    kept = float((w.abs().double() * refined.keep[0]).sum() / w.abs().double().sum())
    assert kept == pytest.approx(refined.kept_fraction, rel=1e-9)


def test_refine_beats_naive_and_repeats_for_a_seed() -> None:
    w = _structured(64, 96, seed=11)
    a, b = (refined_weight(w, (8, 8), 0.75, steps=REFINE_STEPS) for _ in range(2))
    assert a.kept_fraction >= _naive_kept(w, (8, 8), 0.75) - 1e-12
    assert all(torch.equal(a.orders[k], b.orders[k]) for k in a.orders)
    assert torch.equal(a.keep[0], b.keep[0])


def test_refine_gains_where_em_has_converged() -> None:
    # FAST ends at an EM fixed point (no swap helps its own mask); moves scored on the re-selected
    # top blocks, with some downhill steps, still find more kept L1 here.
    w = _structured(64, 96, seed=3)
    warm, refined = tetris_weight(w, (8, 8), 0.8, FAST), refined_weight(w, (8, 8), 0.8, steps=REFINE_STEPS)
    assert refined.kept_fraction > warm.kept_fraction + 1e-3


def test_refine_scores_every_swap_exactly() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        lines = rng.random((int(rng.integers(2, 7)), int(rng.integers(1, 9))))
        keep = int(rng.integers(1, lines.size))
        a = rng.integers(len(lines), size=8)
        b = (a + rng.integers(1, len(lines), size=8)) % len(lines)
        delta = rng.normal(scale=0.3, size=(8, lines.shape[1]))
        scored = _after_swap(lines, keep, a, b, delta)
        for k in range(8):
            moved = lines.copy()
            moved[a[k]] += delta[k]
            moved[b[k]] -= delta[k]
            assert scored[k] == pytest.approx(kept_sum(moved, keep), abs=1e-9)


def test_refine_leaves_shared_variable_problems_to_em() -> None:
    w1, w2 = _structured(64, 32, seed=12), _structured(48, 64, seed=13)
    ops = [Operand(w1, ("h", None), (8, 0)), Operand(w2, (None, "h"), (0, 8))]
    plain, refined = tetris(ops, 0.5), refined_tetris(ops, 0.5, FAITHFUL, steps=REFINE_STEPS)
    assert torch.equal(plain.orders["h"], refined.orders["h"])
    assert plain.history == refined.history
