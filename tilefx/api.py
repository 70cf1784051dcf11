"""The front door: ``optimize`` (pure torch) and ``compile`` (TVM kernels, imported lazily)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx

from tilefx.errors import LoweringError, PreconditionError, RecipeError
from tilefx.lowering.fallback import FALLBACKS
from tilefx.passes.analysis.detect_blocks import DetectBlocksPass, has_sparsity_records
from tilefx.passes.coverage import CoverageWarning, warn_coverage
from tilefx.passes.criteria import criterion
from tilefx.passes.graph_utils import check_state_names
from tilefx.passes.infra.instruments import Instrument, TimingInstrument
from tilefx.passes.infra.manager import PassManager, PipelineResult
from tilefx.passes.infra.pass_base import PassBase
from tilefx.passes.infra.preconditions import require_aten_graph
from tilefx.passes.metadata import Quantized, get_metadata, set_metadata
from tilefx.passes.recover_sparsity import RecoverSparsityPass
from tilefx.passes.search.space import SpeedSearch
from tilefx.passes.training.calibration import Calibration, as_calibration

from .graph_capture import capture, check_capturable, check_finite
from .pipeline import default_pipeline
from .recipe import Recipe
from .report_html import write_report
from .speed_target import SearchReport, search_pipeline

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
    report: str | os.PathLike[str] | None = None,
) -> torch.fx.GraphModule:
    """Capture ``model`` and run the recipe's pipeline; returns a new, verified GraphModule.

    The caller's model is never mutated (its parameters and buffers stay byte-identical).
    ``passes`` replaces the default pipeline (see :func:`tilefx.pipeline.default_pipeline`);
    ``instruments`` observe it (timing, graph dumps). Raises a subclass of ``OptimizeError``:
    ``CaptureError`` for a model that is not an ``nn.Module``, has no data (meta device) or
    non-finite weights; ``RecipeError`` for a bad recipe, including ``protect`` names that match
    no parameter. A block recipe that leaves layers dense warns (``tilefx.CoverageWarning``).
    ``calibration``: batches ``(inputs, labels)`` for data-driven criteria, for
    ``Recipe(recovery=...)``, where ``labels=None`` means unlabeled (learn from the dense model),
    and for ``Quantization(scheme="static")`` or ``tolerance`` (labels unused).
    ``report``: a directory to write ``report.html`` and its pictures into (``tilefx.report_html``).
    """
    recipe = Recipe() if recipe is None else recipe
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"recipe must be a tilefx.Recipe, got {type(recipe).__name__}")
    _check_sequence("passes", passes or (), PassBase)
    _check_sequence("instruments", instruments, Instrument)
    check_capturable(model)
    check_finite(model)
    gm = capture(model, example_inputs)
    inputs = tuple(example_inputs) if not isinstance(example_inputs, torch.Tensor) else (example_inputs,)
    if recipe.channels is not None:
        check_state_names(gm, recipe.channels.protect, "ChannelPruning.protect")
    if recipe.quantize is not None:
        check_state_names(gm, recipe.quantize.keep, "Quantization.keep")
    channels = recipe.channels
    needs_data = channels is not None and (
        criterion(channels.criterion).needs_calibration or channels.refit > 0
    )
    needs_data |= recipe.quantize is not None and recipe.quantize.needs_calibration
    if needs_data or recipe.prior is not None:
        _check_calibration(calibration, inputs)
    timing = TimingInstrument()
    if report is not None:
        instruments = (*instruments, timing)
    searched = None
    if recipe.speedup is not None or recipe.quality is not None:
        result, searched = _search(gm, inputs, recipe, calibration)
    else:
        pipeline = list(passes) if passes is not None else default_pipeline(recipe, calibration)
        result = PassManager(pipeline, instruments, verify=recipe.verify, tolerance=recipe.tolerance).run(
            gm, inputs
        )
    out = result.graph_module
    if searched is not None:
        out.meta["speed_search"] = searched
    set_metadata(out, dataclasses.replace(get_metadata(out), recipe=recipe, verification=result.checks))
    log.info("optimize: ran %s", ", ".join(f"{n}{'*' if m else ''}" for n, m in result.ran))
    if report is not None:
        write_report(report, out, inputs, dense=gm, timings=timing.timings)
    return out


def _search(
    gm: torch.fx.GraphModule, inputs: tuple[Any, ...], recipe: Recipe, calibration: Any
) -> tuple[PipelineResult, SearchReport]:
    """``Recipe(speedup=...)`` / ``quality=...``: the speed search, then any recovery training."""
    _check_calibration(calibration, inputs)
    data = as_calibration(calibration, "Recipe.speedup" if recipe.speedup is not None else "Recipe.quality")
    tail = [] if recipe.recovery is None else [RecoverSparsityPass(recipe.recovery, data)]
    return search_pipeline(
        gm,
        inputs,
        data,
        speedup=recipe.speedup,
        quality=recipe.quality,
        search=recipe.search or SpeedSearch(),
        tail=tail,
        verify=recipe.verify,
        tolerance=recipe.tolerance,
    )


def compile(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | None = None,
    target: str | dict[str, Any] = "llvm",
    **options: Any,
) -> torch.nn.Module:  # noqa: A001
    """Lower a block-sparse or quantized model: sparse layers become TVM block-sparse kernels,
    int8/bf16 layers (``Recipe(quantize=...)``) int8/bf16 kernels, the rest stays torch.

    ``model`` is what ``tilefx.optimize`` returns, or any ``nn.Module`` (a model pruned elsewhere,
    a ``symbolic_trace`` graph), which is captured with ``example_inputs`` (``tilefx.capture``).
    A graph with no sparsity records gets them from the zeros in its weights
    (:class:`~tilefx.passes.analysis.detect_blocks.DetectBlocksPass`), so block sparsity made by
    ``torch.ao.pruning``, Torch-Pruning or by hand is lowered too.
    A sparse layer whose kernel is not faster than dense torch for its shape stays torch
    (``fallback="measure"``, the default; ``fallback="never"`` always lowers): see
    ``tilefx.lowering.fallback``. Other options go to ``tilefx.lowering.build.compile_graph``.
    Raises, before compiling anything: ``RecipeError`` for an unknown or ill-typed option;
    ``LoweringError`` for something that is not a model, a module that must be captured but has
    no ``example_inputs``, an unknown target, ``target="cuda"`` where torch sees no GPU, or
    quantized layers on a target without their CPU feature (``avx512vnni``, ``avx512bf16``) or on
    CUDA;
    ``CaptureError`` when capturing fails. Warns (``tilefx.CoverageWarning``) when it lowers
    nothing: no block-sparse layer in the graph, or none whose kernel was faster; some layers kept
    dense by measurement is the design and is only logged (``lowering_choices`` has each decision).
    The model is never mutated. ``compile(gm, "llvm")`` (target second) still works, deprecated.
    """
    from tilefx.lowering import compat  # tvm is imported only here
    from tilefx.lowering.build import compile_graph, lowering_choices

    if _is_target(example_inputs):  # the pre-example_inputs call compile(gm, "llvm")
        warnings.warn("pass the target by keyword: compile(gm, target=...)", DeprecationWarning, stacklevel=2)
        example_inputs, target = None, example_inputs  # type: ignore[assignment]
    if not isinstance(model, torch.nn.Module):
        raise LoweringError(
            f"tilefx.compile lowers a torch.nn.Module or the fx.GraphModule that tilefx.optimize returns, "
            f"got {type(model).__name__} (not a model)"
        )
    if "fuse_relu" in options:  # renamed when GELU joined ReLU in the epilogue
        warnings.warn("fuse_relu is now fuse_activations", DeprecationWarning, stacklevel=2)
        options["fuse_activations"] = options.pop("fuse_relu")
    _check_compile_options(options, inspect.signature(compile_graph))
    try:
        cuda = compat.is_cuda(compat.make_target(target))
    except (TypeError, ValueError) as exc:  # make_target types the errors it expects, not these
        raise LoweringError(
            f"target must be a name like 'llvm', a dict or a tvm Target, got {target!r}"
        ) from exc
    if cuda and not torch.cuda.is_available():
        raise LoweringError(
            f"target {target!r}: torch sees no CUDA device here (torch.cuda.is_available() is False), "
            "so the compiled model could not run; compile for 'llvm', or on a machine with a GPU"
        )
    gm = _with_detected_blocks(_aten_graph(model, example_inputs))
    out = compile_graph(gm, target, **options)
    if not _is_quantized(gm):  # compile_graph warned about quantized layers left to torch
        _warn_nothing_lowered(lowering_choices(out))
    return out


def _is_target(value: object) -> bool:
    return isinstance(value, (str, dict)) or type(value).__name__ == "Target"


def _aten_graph(model: torch.nn.Module, example_inputs: Sequence[Any] | None) -> torch.fx.GraphModule:
    """``model`` itself when it is an ATen-level graph, else its capture on ``example_inputs``."""
    if isinstance(model, torch.fx.GraphModule) and _is_aten_graph(model):
        return model
    if example_inputs is None:
        kind = (
            "an fx.GraphModule that is not ATen-level"
            if isinstance(model, torch.fx.GraphModule)
            else "a torch.nn.Module"
        )
        raise LoweringError(
            f"tilefx.compile got {type(model).__name__} ({kind}) without example_inputs; pass "
            "example_inputs=(x,) so it can be captured, or run tilefx.optimize(model, example_inputs, recipe=...) first"
        )
    check_finite(model)
    return capture(model, example_inputs)


def _is_aten_graph(gm: torch.fx.GraphModule) -> bool:
    try:
        require_aten_graph("tilefx.compile", gm)
    except PreconditionError:
        return False
    return True


def _with_detected_blocks(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` as is when it has sparsity records, else a view of it with the block sparsity detected.

    The view shares ``gm``'s parameters and copies its graph and metadata, so ``gm`` is untouched.
    """
    if has_sparsity_records(gm) or _is_quantized(gm):
        return gm
    view = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    view.meta.update(gm.meta)
    DetectBlocksPass()(view)
    return view


def _is_quantized(gm: torch.fx.GraphModule) -> bool:
    """Quantization runs last: its records are final, and a grid's zeros are no pruning to detect."""
    return any(isinstance(r, Quantized) for records in get_metadata(gm).params.values() for r in records)


def _check_sequence(name: str, items: Sequence[object], kind: type) -> None:
    for index, item in enumerate(items):
        if not isinstance(item, kind):
            raise RecipeError(
                f"optimize: {name}[{index}] must be of type {kind.__name__}, got {type(item).__name__}"
            )


def _check_calibration(calibration: object, example_inputs: tuple[Any, ...]) -> None:
    """Batch 0 must hold as many inputs as ``example_inputs``, of the same rank and kind, finite.

    Checked up front so a mismatch names the calibration data, not a torch error deep inside a
    criterion. Only re-iterable data is looked at: peeking would consume a one-shot iterator.
    """
    batches = calibration.batches if isinstance(calibration, Calibration) else calibration
    if not isinstance(batches, Iterable) or isinstance(batches, torch.Tensor) or iter(batches) is batches:
        return  # the criterion names a missing or non-iterable one; a one-shot iterator is left alone
    first = next(iter(batches), None)
    if not isinstance(first, (tuple, list)) or len(first) != 2:
        return  # Calibration names a batch that is not an (inputs, labels) pair
    given = (first[0],) if isinstance(first[0], torch.Tensor) else tuple(first[0])
    if len(given) != len(example_inputs):
        raise RecipeError(
            f"calibration batch 0 has {len(given)} model input(s), example_inputs has {len(example_inputs)}"
        )
    for index, (tensor, example) in enumerate(zip(given, example_inputs, strict=True)):
        if not isinstance(tensor, torch.Tensor) or not isinstance(example, torch.Tensor):
            continue
        if tensor.dim() != example.dim() or tensor.is_floating_point() != example.is_floating_point():
            raise RecipeError(
                f"calibration batch 0, input {index}: {tensor.dtype} of shape {tuple(tensor.shape)} does "
                f"not match example_inputs[{index}] ({example.dtype} of shape {tuple(example.shape)})"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RecipeError(f"calibration batch 0, input {index} has non-finite values (NaN or inf)")


def _check_compile_options(options: dict[str, Any], signature: inspect.Signature) -> None:
    known = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"options: {', '.join(known)}"
            raise RecipeError(f"tilefx.compile: unknown option {key!r}; {hint}")
    if options.get("fallback", "measure") not in FALLBACKS:
        raise RecipeError(
            f"tilefx.compile: unknown fallback {options['fallback']!r}; expected one of {', '.join(FALLBACKS)}"
        )
    if not isinstance(options.get("fuse_activations", True), bool):
        raise RecipeError(
            f"tilefx.compile: fuse_activations must be True or False, got {options['fuse_activations']!r}"
        )
    cache_dir = options.get("cache_dir")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise RecipeError(f"tilefx.compile: cache_dir must be a path, got {type(cache_dir).__name__}")


def _warn_nothing_lowered(choices: Sequence[Any]) -> None:
    if not choices:
        warnings.warn(
            "tilefx.compile lowered nothing: no layer of the graph is block-sparse (no sparsity record, "
            "and no weight whose zeros form blocks of a detected shape; or none has a kernel for this "
            "target), so it runs as torch (block-prune with Recipe(blocks=...); optimize warns about "
            "layers it left dense)",
            CoverageWarning,
            stacklevel=3,
        )
        return
    if any(choice.lowered for choice in choices):
        return
    left = [("the kernel was not faster than dense torch on its input shape", c.node) for c in choices]
    warn_coverage(
        "tilefx.compile",
        len(choices),
        "block-sparse layers kept dense torch",
        left,
        "The compiled model runs as torch; try larger blocks or a higher sparsity, or "
        "fallback='never' to lower them anyway",
    )
