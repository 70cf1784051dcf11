"""The default pipeline: an ordered list of passes, built from a recipe in one function.

To insert your own pass, take this list, edit it, and hand it to ``optimize(..., passes=...)``.
"""

from __future__ import annotations

from typing import Any

from tilefx.passes.cleanup import EliminateDeadCodePass
from tilefx.passes.fold_batchnorm import FoldBatchNormPass
from tilefx.passes.infra.errors import RecipeError
from tilefx.passes.infra.pass_base import PassBase

from .recipe import Recipe

__all__ = ["default_pipeline"]


def default_pipeline(recipe: Recipe, calibration: Any = None) -> list[PassBase]:
    """Passes in the order the methods compose (seeds.md): fold, shrink channels, sparsify, clean up."""
    passes: list[PassBase] = []
    if recipe.fold_batchnorm:
        passes.append(FoldBatchNormPass())
    passes.append(EliminateDeadCodePass())
    for name in ("channels", "connections", "blocks"):
        if getattr(recipe, name) is not None:
            raise RecipeError(
                f"Recipe.{name}: this pruning method is not available in this build of tilefx yet"
            )
    return passes
