"""Lazy, cached analyses, invalidated after a modifying pass unless it preserved them."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import torch
import torch.fx

__all__ = ["Analysis", "AnalysisManager"]

R = TypeVar("R")


class Analysis(abc.ABC, Generic[R]):
    """A read-only question about a graph. Subclasses are frozen (hashable) dataclasses."""

    @abc.abstractmethod
    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> R:
        """Compute the answer; may ask ``am`` for other analyses."""


class AnalysisManager:
    """Caches analysis results for the graph module currently in the pipeline.

    ``unpruned``: the graph as it stood before the pipeline's first pass that changes numbers
    (after the exact ones, e.g. batch-norm folding: the same function as the input, in the
    pruned graph's form), for passes that learn from the model before it was pruned — a refit or
    a distillation after channel pruning. Kept only when a pass ``reads_unpruned``; None when a
    pass runs on its own.
    """

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any] = (),
        unpruned: torch.fx.GraphModule | None = None,
    ) -> None:
        self.gm = gm
        self.example_inputs = tuple(example_inputs)
        self.unpruned = unpruned
        self._cache: dict[Analysis[Any], Any] = {}
        self.computed = 0  # how many analyses were actually run (for tests and reports)

    def get(self, analysis: Analysis[R]) -> R:
        if analysis not in self._cache:
            self._cache[analysis] = analysis.run(self.gm, self)
            self.computed += 1
        return self._cache[analysis]  # type: ignore[no-any-return,unused-ignore]

    def cached(self, analysis: Analysis[Any]) -> bool:
        return analysis in self._cache

    def update(self, gm: torch.fx.GraphModule, preserved: frozenset[type] = frozenset()) -> None:
        """Point at ``gm`` (the result of a modifying pass) and drop what it did not preserve."""
        self.gm = gm
        self._cache = {a: r for a, r in self._cache.items() if type(a) in preserved}
