"""How much to prune at each training step: one-shot, or the cubic gradual schedule of Zhu & Gupta.

Zhu & Gupta (2017, "To prune, or not to prune") raise sparsity from ``s_i`` to ``s_f`` over
``n`` pruning steps spaced ``Δt`` apart, starting at ``t0``::

    s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (n·Δt))³

so pruning is fast while many redundant weights remain and slows as few are left. Masks are
re-selected only at pruning steps (every ``every`` steps, and at ``end``), so the network has
``every`` optimiser steps to recover between two mask changes. The target is reached exactly at
``end`` and held afterwards.
"""

from __future__ import annotations

from typing import Literal

from tilefx.errors import RecipeError
from tilefx.options import option, options

__all__ = ["SparsitySchedule"]


@options
class SparsitySchedule:
    """Sparsity as a function of the step (0-based, before that step's optimiser update).

    kind: "gradual" (cubic ramp from ``initial`` at ``begin`` to ``target`` at ``end``) or
    "oneshot" (``target`` from step 0). every: steps between mask re-selections on the ramp.
    """

    target: float
    end: int = 0
    begin: int = option(default=0, ge=0)
    every: int = option(default=1, ge=1)
    initial: float = 0.0
    kind: Literal["gradual", "oneshot"] = "gradual"

    def check(self) -> None:
        if not 0 <= self.initial <= self.target < 1:
            raise RecipeError(
                f"SparsitySchedule needs 0 <= initial <= target < 1, got {self.initial}, {self.target}"
            )
        if self.end < self.begin:
            raise RecipeError(
                f"SparsitySchedule needs 0 <= begin <= end and every >= 1, got {self.begin}, {self.end}, {self.every}"
            )

    def at(self, step: int) -> float:
        """The sparsity in force at ``step``: exactly ``target`` from ``end`` on."""
        if self.kind == "oneshot" or step >= self.end:
            return self.target
        if step <= self.begin:
            return self.initial
        left = 1.0 - (step - self.begin) / (self.end - self.begin)
        return self.target + (self.initial - self.target) * left**3

    def prunes_at(self, step: int) -> bool:
        """Whether masks are re-selected before ``step``: the first step, every ``every`` on the
        ramp, and ``end`` itself (so the target is applied exactly there)."""
        if step == 0 or step == self.end:
            return True
        if self.kind == "oneshot" or step > self.end or step < self.begin:
            return False
        return (step - self.begin) % self.every == 0
