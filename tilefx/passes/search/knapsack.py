"""The per-layer choice under a latency budget: a multiple-choice knapsack solved by dynamic programming.

Every layer (a unit of the model that can be changed on its own) has options — keep it dense, prune
it to some block shape and sparsity, run it in another number format — each with a measured time
and an estimated loss. The search picks one option per layer so that the summed time fits a budget
and the summed loss is least; with losses that add up over layers (the first-order model SPDY and
ZipLM use) that is the multiple-choice knapsack problem, which dynamic programming over a
discretised time axis solves exactly up to the discretisation (Frantar & Alistarh, "SPDY:
Accurate Pruning with Speedup Guarantees", ICML 2022, §3.1; Kurtic et al., "ZipLM", NeurIPS
2023, use the same DP over structured options).

Times are rounded *up* to the grid, so every assignment the DP returns keeps its true summed time
within the budget: the speed target is a guarantee of the latency model, not a hope. One DP pass
gives the least loss for every budget on the grid at once (:class:`Frontier`), so the dual
question — the fastest assignment whose loss stays under a ceiling — reads the same table.

Pure numpy: the latency table comes from measured kernels (``tilefx.lowering``), the losses from
calibration data (``tilefx.passes.training``); this module only decides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tilefx.errors import RecipeError

__all__ = ["Choice", "Frontier", "LayerChoices", "frontier", "search"]


@dataclass(frozen=True)
class Choice:
    """One way to run a layer: what it is (``name``), its measured milliseconds and its loss."""

    name: str
    ms: float
    loss: float


@dataclass(frozen=True)
class LayerChoices:
    """A layer and the choices it may take (at least one; the dense one is usually among them)."""

    layer: str
    choices: tuple[Choice, ...]

    def __post_init__(self) -> None:
        if not self.choices:
            raise RecipeError(f"layer {self.layer!r} has no choice to search over")
        for choice in self.choices:
            if not (math.isfinite(choice.ms) and choice.ms >= 0 and math.isfinite(choice.loss)):
                raise RecipeError(
                    f"layer {self.layer!r}, choice {choice.name!r}: time and loss must be finite and "
                    f"time >= 0, got {choice.ms} ms, loss {choice.loss}"
                )


@dataclass(frozen=True, eq=False)
class Frontier:
    """The DP's table: for every budget on the grid, the least summed loss and the choices giving it.

    ``step``: grid width in ms; ``best[b]``: least loss with summed (rounded-up) time ≤ ``b·step``
    (``inf`` where nothing fits); ``pick[i, b]``: the choice of layer ``i`` in that assignment,
    recovered backwards by :meth:`assignment`.
    """

    layers: tuple[LayerChoices, ...]
    step: float
    best: np.ndarray
    pick: np.ndarray
    cost: np.ndarray  # [layers, buckets]: the least loss of layers[: i + 1] within b buckets

    def assignment(self, budget_ms: float) -> dict[str, Choice]:
        """The least-loss choices whose summed time fits ``budget_ms``; RecipeError when none fits."""
        bucket = min(int(math.floor(budget_ms / self.step + 1e-9)), self.best.shape[0] - 1)
        if bucket < 0 or not math.isfinite(self.best[bucket]):
            fastest = sum(min(c.ms for c in layer.choices) for layer in self.layers)
            raise RecipeError(
                f"no assignment fits {budget_ms:.3f} ms: the fastest choice of every layer sums to "
                f"{fastest:.3f} ms"
            )
        out: dict[str, Choice] = {}
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            choice = layer.choices[int(self.pick[i, bucket])]
            out[layer.layer] = choice
            bucket -= _buckets(choice.ms, self.step)
        return dict(reversed(list(out.items())))

    def fastest_within(self, loss: float) -> dict[str, Choice]:
        """The assignment with the smallest budget whose least loss is at most ``loss``."""
        fits = np.flatnonzero(self.best <= loss)
        if fits.size == 0:
            raise RecipeError(f"no assignment keeps the loss at or below {loss:g}")
        return self.assignment(float(fits[0]) * self.step)


def search(layers: Sequence[LayerChoices], budget_ms: float, buckets: int = 2000) -> dict[str, Choice]:
    """The least-loss choice per layer with summed time ≤ ``budget_ms`` (a grid of ``buckets`` steps)."""
    return frontier(layers, budget_ms, buckets).assignment(budget_ms)


def frontier(layers: Sequence[LayerChoices], horizon_ms: float, buckets: int = 2000) -> Frontier:
    """The DP over budgets 0 … ``horizon_ms`` on a grid of ``buckets`` steps.

    Cost ``O(layers · choices · buckets)``. Times round up to the grid, so a returned assignment's
    true time never exceeds the budget asked; a finer grid only lets more assignments in.
    """
    if not layers:
        raise RecipeError("the search needs at least one layer")
    if not (math.isfinite(horizon_ms) and horizon_ms > 0) or buckets < 1:
        raise RecipeError(f"the search needs a positive budget and grid, got {horizon_ms} ms, {buckets}")
    step = horizon_ms / buckets
    size = buckets + 1
    cost = np.full((len(layers), size), np.inf)
    pick = np.zeros((len(layers), size), dtype=np.int64)
    previous = np.zeros(size)  # no layer yet: zero loss at any budget
    for i, layer in enumerate(layers):
        current = np.full(size, np.inf)
        for index, choice in enumerate(layer.choices):
            width = _buckets(choice.ms, step)
            if width >= size:
                continue
            shifted = np.full(size, np.inf)
            shifted[width:] = previous[: size - width] + choice.loss
            better = shifted < current
            current[better] = shifted[better]
            pick[i, better] = index
        cost[i] = current
        previous = current
    return Frontier(tuple(layers), step, previous, pick, cost)


def _buckets(ms: float, step: float) -> int:
    """Grid cells a time occupies, rounded up (a hair of slack absorbs float noise on exact multiples)."""
    return int(math.ceil(ms / step - 1e-9))
