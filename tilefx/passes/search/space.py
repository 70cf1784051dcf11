"""The speed search's space: which options every unit may take (``Recipe(search=SpeedSearch(...))``)."""

from __future__ import annotations

from tilefx.errors import RecipeError
from tilefx.options import option, options

from ..handlers.api import Attention
from .losses import Option

__all__ = ["SpeedSearch"]


@options
class SpeedSearch:
    """How ``Recipe(speedup=...)`` / ``Recipe(quality=...)`` search.

    keeps: fractions of a structured unit's channels it may keep. formats: number formats a unit
    may run in ("fp32", "int8", "bf16"). blocks / sparsities: the block sparsities a unit's layers
    may take (a block is offered with every format whose kernels take it: int8 needs columns in
    fours). calibration_batches: batches for Hessians and refits; check_batches: further batches,
    held out, on which every option's damage is measured. rounds: make-and-measure rounds that
    correct the latency model. attention: a structured attention unit is whole heads ("heads") or
    head dims ("head_dims"). The default space is small because every option costs a measurement
    (each unit's damage is measured at the output): one block shape, the one both fp32 and int8
    kernels take, at two sparsities; widen it with ``blocks=((1, 1), (4, 1), (16, 1), (32, 32))``.
    """

    keeps: tuple[float, ...] = (1.0, 0.875, 0.75, 0.625, 0.5)
    formats: tuple[str, ...] = ("fp32", "int8")
    blocks: tuple[tuple[int, int], ...] = ((16, 4),)
    sparsities: tuple[float, ...] = (0.5, 0.8)
    calibration_batches: int = option(default=32, ge=1)
    check_batches: int = option(default=4, ge=1)
    rounds: int = option(default=3, ge=1)
    attention: Attention = "heads"
    progress: bool = True

    def check(self) -> None:
        if not self.keeps or any(not 0 < k <= 1 for k in self.keeps):
            raise RecipeError(f"SpeedSearch.keeps must be fractions in (0, 1], got {self.keeps!r}")
        unknown = set(self.formats) - {"fp32", "int8", "bf16"}
        if unknown or "fp32" not in self.formats:
            raise RecipeError(
                f"SpeedSearch.formats must include 'fp32', from 'fp32', 'int8', 'bf16'; got {self.formats!r}"
            )
        if any(not 0 < s < 1 for s in self.sparsities):
            raise RecipeError(f"SpeedSearch.sparsities must be in (0, 1), got {self.sparsities!r}")

    def options(self) -> list[Option]:
        """Every option a unit may take (the structured keeps apply to dense options only)."""
        found = [Option(keep=k, format=f) for k in sorted(set(self.keeps) | {1.0}) for f in self.formats]
        for fmt in self.formats:
            for block in self.blocks:
                if fmt in ("int8", "bf16") and block[1] % (4 if fmt == "int8" else 2):
                    continue
                found += [Option(format=fmt, block=block, sparsity=s) for s in self.sparsities]
        return found
