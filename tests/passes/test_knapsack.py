"""The latency-budget search: exact on toy tables (brute force agrees), never over budget, the dual."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from tilefx.errors import RecipeError
from tilefx.passes.search.knapsack import Choice, LayerChoices, frontier, search


def _toy(seed: int, layers: int = 5, choices: int = 4) -> list[LayerChoices]:
    rng = random.Random(seed)
    out = []
    for i in range(layers):
        dense = rng.randint(4, 12)
        options = [Choice("dense", float(dense), 0.0)]
        for j in range(1, choices):
            options.append(Choice(f"c{j}", float(rng.randint(1, dense)), round(rng.uniform(0.01, 1.0), 3)))
        out.append(LayerChoices(f"layer{i}", tuple(options)))
    return out


def _brute(layers: list[LayerChoices], budget: float) -> float:
    best = math.inf
    for combo in itertools.product(*(layer.choices for layer in layers)):
        if sum(c.ms for c in combo) <= budget:
            best = min(best, sum(c.loss for c in combo))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_the_search_is_exact_on_integer_times_and_meets_the_budget(seed: int) -> None:
    layers = _toy(seed)
    dense = sum(layer.choices[0].ms for layer in layers)
    for budget in (dense, dense * 0.8, dense * 0.6, dense * 0.45):
        want = _brute(layers, budget)
        if math.isinf(want):
            with pytest.raises(RecipeError, match="no assignment fits"):
                frontier(layers, dense, buckets=int(dense) * 4).assignment(budget)
            continue
        table = frontier(layers, dense, buckets=int(dense) * 4)  # a 0.25 ms grid holds integer times exactly
        got = table.assignment(budget)
        assert sum(c.ms for c in got.values()) <= budget + 1e-9
        assert sum(c.loss for c in got.values()) == pytest.approx(want)
        assert list(got) == [layer.layer for layer in layers]


@pytest.mark.parametrize("buckets", [40, 97, 400])
def test_any_grid_rounds_times_up_so_the_budget_still_holds(buckets: int) -> None:
    layers = _toy(3, layers=8)
    dense = sum(layer.choices[0].ms for layer in layers)
    budget = dense * 0.7
    got = search(layers, budget, buckets=buckets)
    assert sum(c.ms for c in got.values()) <= budget + 1e-9
    assert sum(c.loss for c in got.values()) >= _brute(layers, budget) - 1e-12  # never better than exact


def test_one_table_answers_every_budget_and_the_quality_dual() -> None:
    layers = _toy(5)
    dense = sum(layer.choices[0].ms for layer in layers)
    table = frontier(layers, dense, buckets=int(dense) * 4)
    losses = [sum(c.loss for c in table.assignment(b).values()) for b in (dense, dense * 0.8, dense * 0.6)]
    assert losses == sorted(losses)  # less time never costs less loss
    assert sum(c.loss for c in table.assignment(dense).values()) == 0.0  # all dense fits
    fastest = table.fastest_within(losses[1])
    assert sum(c.loss for c in fastest.values()) <= losses[1] + 1e-12
    assert sum(c.ms for c in fastest.values()) <= dense * 0.8 + 1e-9


def test_bad_tables_are_refused_by_name() -> None:
    with pytest.raises(RecipeError, match="'fc' has no choice"):
        LayerChoices("fc", ())
    with pytest.raises(RecipeError, match="'fc', choice 'x'"):
        LayerChoices("fc", (Choice("x", math.nan, 0.0),))
    with pytest.raises(RecipeError, match="positive budget"):
        frontier([LayerChoices("fc", (Choice("dense", 1.0, 0.0),))], 0.0)
