"""The front door: ``optimize`` (pure torch) and ``compile`` (TVM kernels, imported lazily)."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from tilefx.passes.infra.errors import RecipeError
from tilefx.passes.infra.instruments import Instrument
from tilefx.passes.infra.manager import PassManager
from tilefx.passes.infra.pass_base import PassBase
from tilefx.passes.metadata import get_metadata, set_metadata

from .capture import capture, check_finite
from .pipeline import default_pipeline
from .recipe import Recipe

__all__ = ["compile", "optimize"]

log = logging.getLogger(__name__)


def optimize(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    recipe: Recipe | None = None,
    calibration: Any = None,
    *,
    passes: Sequence[PassBase] | None = None,
    instruments: Sequence[Instrument] = (),
) -> torch.fx.GraphModule:
    """Capture ``model`` and run the recipe's pipeline; returns a new, verified GraphModule.

    The caller's model is never mutated (its parameters and buffers stay byte-identical).
    ``passes`` replaces the default pipeline (see :func:`tilefx.pipeline.default_pipeline`);
    ``instruments`` observe it (timing, graph dumps). Raises a subclass of ``OptimizeError``.
    ``calibration``: batches ``(inputs, labels)`` for data-driven criteria and for
    ``Recipe(recovery=...)``, where ``labels=None`` means unlabeled (learn from the dense model).
    """
    recipe = Recipe() if recipe is None else recipe
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"recipe must be a tilefx.Recipe, got {type(recipe).__name__}")
    check_finite(model)
    gm = capture(model, example_inputs)
    inputs = tuple(example_inputs) if not isinstance(example_inputs, torch.Tensor) else (example_inputs,)
    pipeline = list(passes) if passes is not None else default_pipeline(recipe, calibration)
    manager = PassManager(pipeline, instruments, verify=recipe.verify, tolerance=recipe.tolerance)
    result = manager.run(gm, inputs)
    out = result.graph_module
    set_metadata(out, dataclasses.replace(get_metadata(out), recipe=recipe))
    log.info("optimize: ran %s", ", ".join(f"{n}{'*' if m else ''}" for n, m in result.ran))
    return out


def compile(
    gm: torch.fx.GraphModule, target: str | dict[str, Any] = "llvm", **options: Any
) -> torch.nn.Module:  # noqa: A001
    """Lower an optimized graph: sparse layers become TVM block-sparse kernels, the rest stays torch.

    A sparse layer whose kernel is not faster than dense torch for its shape stays torch
    (``fallback="measure"``, the default; ``fallback="never"`` always lowers): see
    ``tilefx.lowering.fallback``. Other options go to ``tilefx.lowering.build.compile_graph``.
    """
    from tilefx.lowering.build import compile_graph  # tvm is imported only here

    if "fuse_relu" in options:  # renamed when GELU joined ReLU in the epilogue
        warnings.warn("fuse_relu is now fuse_activations", DeprecationWarning, stacklevel=2)
        options["fuse_activations"] = options.pop("fuse_relu")
    return compile_graph(gm, target, **options)
