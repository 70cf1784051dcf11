"""``export``: an optimized model as a standalone artifact that runs without torch or tilefx's passes.

The whole model becomes one Relax VM executable (``lowering.relax_export``) in one shared
library, weights embedded; ``manifest.json`` says what it takes and returns, what it was built
with and for, and the sha256 of every file. ``tilefx.runtime.load`` reads it back. Before
writing, the artifact is run once on the example inputs and compared with the optimized model
(the export is verified like every pass).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx

from tilefx._version import __version__
from tilefx.errors import LoweringError, VerificationError
from tilefx.passes.quant_ops import is_fake_quant as quantized_input_op
from tilefx.runtime import artifact as runtime_artifact
from tilefx.runtime.sparse_modules import BsrConv2d, BsrLinear, NarrowLinear

__all__ = ["export"]

log = logging.getLogger(__name__)

#: Relative error the artifact may show against the optimized torch model on the example inputs.
_TOLERANCE = 1e-4
#: Quantized models: the artifact may differ from the torch graph by this multiple of the
#: activation quantization's own effect (see ``_quantization_noise``).
_QUANTIZED_FACTOR = 2.0


def export(
    optimized_gm: torch.fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    target: str | dict[str, Any] = "llvm",
    *,
    recipe: Any = None,
) -> Path:
    """Write ``optimized_gm`` (a ``tilefx.optimize`` result) to the artifact directory ``path``.

    The artifact is specialised to the shapes and dtypes of ``example_inputs``. Block-sparse
    layers run our kernels with their pruned pattern, other linear and conv layers our kernels at
    full density. ``recipe`` (the ``tilefx.Recipe`` or dict it was optimized with) is recorded
    in the manifest.
    Raises ``UnsupportedOpError`` naming a node TVM's importer cannot convert, ``LoweringError``
    for an unknown or non-CPU target, ``VerificationError`` if the built artifact disagrees with
    the optimized model. An existing ``path`` is replaced only once the new artifact is complete.
    """
    from tilefx.lowering import compat  # tvm is imported only here
    from tilefx.lowering.relax_export import relax_program

    if not isinstance(optimized_gm, torch.fx.GraphModule):
        raise LoweringError(
            f"export takes the GraphModule tilefx.optimize returns, got {type(optimized_gm).__name__}"
        )
    _check_not_compiled(optimized_gm)
    inputs = tuple(example_inputs)
    tvm_target = compat.make_target(target)
    program = relax_program(optimized_gm, inputs, tvm_target)
    expected = _outputs(optimized_gm, inputs)
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        _build(program, tvm_target, staging)
        manifest = _manifest(program, tvm_target, inputs, expected, staging, recipe)
        (staging / runtime_artifact.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _verify(
            staging,
            inputs,
            expected,
            noise=_quantization_noise(optimized_gm, inputs, expected)
            if any(layer.number_format != "fp32" for layer in program.layers)
            else None,
        )
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %d layers on our kernels to %s", len(program.layers), destination)
    return destination


def _check_not_compiled(gm: torch.fx.GraphModule) -> None:
    """A ``tilefx.compile`` result calls runtime modules that torch.export cannot see through."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(
            gm.get_submodule(str(node.target)), BsrLinear | BsrConv2d | NarrowLinear
        ):
            raise LoweringError(
                f"export: node {node.name!r} calls a compiled kernel module; export the graph "
                "tilefx.optimize returned, not the one tilefx.compile returned"
            )


def _build(program: Any, target: Any, directory: Path) -> None:
    import tvm

    from tilefx.lowering.relax_export import relax_pipeline

    try:
        executable = tvm.compile(program.module, target, relax_pipeline=relax_pipeline(target))
        executable.export_library(str(directory / runtime_artifact.LIBRARY))
    except Exception as exc:  # TVM raises its own error types; ours must be typed
        raise LoweringError(f"export: TVM could not build the model for {target}: {exc}") from exc


def _outputs(
    gm: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...]
) -> tuple[np.ndarray, ...] | np.ndarray:
    with torch.no_grad():
        result = gm(*inputs)
    if isinstance(result, torch.Tensor):
        return result.detach().cpu().numpy()
    flat = torch.utils._pytree.tree_leaves(result)
    return tuple(t.detach().cpu().numpy() for t in flat if isinstance(t, torch.Tensor))


def _manifest(
    program: Any,
    target: Any,
    inputs: tuple[torch.Tensor, ...],
    expected: tuple[np.ndarray, ...] | np.ndarray,
    directory: Path,
    recipe: Any,
) -> dict[str, Any]:
    import tvm
    from tvm.target import codegen

    outputs = expected if isinstance(expected, tuple) else (expected,)
    spec = runtime_artifact.TensorSpec
    library = runtime_artifact.LIBRARY
    return {
        "format": runtime_artifact.FORMAT,
        "format_version": runtime_artifact.FORMAT_VERSION,
        "library": library,
        "inputs": [
            spec(name, tuple(x.shape), str(x.detach().cpu().numpy().dtype)).to_json()
            for name, x in zip(program.input_names, inputs, strict=True)
        ],
        "outputs": [
            spec(f"output_{i}", tuple(y.shape), str(y.dtype)).to_json() for i, y in enumerate(outputs)
        ],
        "single_output": not isinstance(expected, tuple),
        "tilefx_version": __version__,
        "tvm_version": tvm.__version__,
        "target": str(target),
        "arch": platform.machine(),
        "cpu_features": sorted(runtime_artifact.isa_features(codegen.llvm_get_cpu_features(target))),
        "required_features": _required_features(program),
        "recipe": _recipe_json(recipe),
        "layers": [dataclasses.asdict(layer) for layer in program.layers],
        "files": {library: runtime_artifact.file_digest(directory / library)},
    }


def _required_features(program: Any) -> dict[str, str]:
    """The CPU feature each number format of the artifact's kernels needs, by format (int8: VNNI)."""
    from tilefx.lowering.narrow import REQUIRED_FEATURE

    formats = sorted({layer.number_format for layer in program.layers if layer.number_format != "fp32"})
    return {fmt: REQUIRED_FEATURE[fmt] for fmt in formats}


def _recipe_json(recipe: Any) -> Any:
    if recipe is None:
        return None
    if dataclasses.is_dataclass(recipe) and not isinstance(recipe, type):
        recipe = dataclasses.asdict(recipe)
    try:
        return json.loads(json.dumps(recipe, default=str))
    except (TypeError, ValueError):
        return str(recipe)


def _verify(
    directory: Path, inputs: tuple[torch.Tensor, ...], expected: Any, *, noise: float | None = None
) -> None:
    """The artifact's outputs against the optimized model's: max error ≤ 1e-4 of the output scale,
    or, with quantized layers (``noise`` given), relative Frobenius error ≤ 2 × ``noise``."""
    loaded = runtime_artifact.load(directory)
    got = loaded(*(x.detach().cpu().numpy() for x in inputs))
    pairs = zip(got, expected, strict=True) if isinstance(expected, tuple) else [(got, expected)]
    for index, (actual, reference) in enumerate(pairs):
        if noise is None:
            error, allowed, what = relative_error(actual, reference), _TOLERANCE, "max relative error"
        else:
            error, what = frobenius_error(actual, reference), "relative Frobenius error"
            allowed = max(_TOLERANCE, _QUANTIZED_FACTOR * noise)
        if error > allowed:
            raise VerificationError(
                f"export: output {index} of the artifact differs from the optimized model "
                f"({what} {error:.2e} > {allowed:.1e})"
            )


def _quantization_noise(gm: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...], expected: Any) -> float:
    """How much the activation fake-quant nodes move the optimized model's outputs (relative
    Frobenius error of the model run with them bypassed; the largest over outputs).

    A quantized layer rounds its input to int8 codes (or bf16). Where the artifact's fp32 sums
    differ from torch's in the last bit, an element can land on the neighbouring code; the next
    layers then see inputs that differ by a quantization step and round differently again, so
    past a few layers the artifact and the torch graph are two draws of the same quantization
    noise (all-MiniLM-L6-v2 int8: 2.7e-2 apart, each 0.9989 cosine to fp32;
    ``benchmarks/results/quant_minilm_quality.md``). So quantized models
    are checked against that noise's own size rather than fp32 rounding: a wrong kernel (scales,
    zero points, layout) moves outputs by far more.
    """
    bypassed = copy.deepcopy(gm)
    for node in list(bypassed.graph.nodes):
        if quantized_input_op(node):
            node.replace_all_uses_with(node.args[0])
            bypassed.graph.erase_node(node)
    bypassed.recompile()
    plain = _outputs(bypassed, inputs)
    quantized = expected if isinstance(expected, tuple) else (expected,)
    unrounded = plain if isinstance(plain, tuple) else (plain,)
    return max(frobenius_error(q, p) for q, p in zip(quantized, unrounded, strict=True))


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """Max |actual - reference| over max |reference| (0 for two all-zero arrays)."""
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    diff = float(np.abs(actual.astype(np.float64) - reference).max()) if reference.size else 0.0
    return diff / scale if scale else diff


def frobenius_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """‖actual − reference‖ / ‖reference‖ (Frobenius; the absolute norm for an all-zero reference)."""
    diff = float(np.linalg.norm(actual.astype(np.float64) - reference))
    scale = float(np.linalg.norm(reference.astype(np.float64)))
    return diff / scale if scale else diff
