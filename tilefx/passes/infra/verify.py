"""Verification between passes: graph lint, shapes re-propagated on example inputs, numerics.

On by default in every pipeline and always on in tests. A masked pass must reproduce its own
``masked_reference``. An exact pass must reproduce the *reference*: the pipeline's input, or what
the last pass that may change values claimed (a masked pass's masked reference, an unchecked
pass's output). Exact passes never move the reference, so small errors cannot add up pass by pass.

Both are compared in float32 first; only where that fails are the expected graph and the result
run in float64 (weights, floating inputs and dtype arguments widened). fp32 rounding grows with
depth, width and the data (a reordered or shrunk MiniLM on 16 × 32 tokens differs by ~1e-5 of its
output scale), so no constant fp32 tolerance tells it from a mistake; in float64 folding,
reordering and removing zeros are invisible and a real mistake is not. (Always running float64
costs 4x the test sweep's time: CPU float64 convolutions have no fast kernels.) If a graph cannot
run in float64, the float32 failure stands and the message says why.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from tilefx.errors import VerificationError

from .analysis_manager import AnalysisManager
from .instruments import Instrument
from .pass_base import PassBase, PassResult

__all__ = ["PassCheck", "VerifyInstrument", "assert_outputs_close", "lint", "run_checked", "run_float64"]

log = logging.getLogger(__name__)


def lint(gm: torch.fx.GraphModule, where: str = "graph") -> None:
    """fx's own lint plus: every get_attr names an existing parameter, buffer or submodule."""
    try:
        gm.graph.lint()
    except Exception as exc:  # fx raises bare RuntimeErrors
        raise VerificationError(f"{where}: graph lint failed: {exc}") from exc
    if gm.graph.python_code("self").src != gm.code:
        raise VerificationError(f"{where}: the graph was edited without gm.recompile(); forward() is stale")
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not _has_attr(gm, str(node.target)):
            raise VerificationError(f"{where}: node {node.name!r} reads missing attribute {node.target!r}")


def _has_attr(gm: torch.nn.Module, target: str) -> bool:
    obj: Any = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


class _CheckingInterpreter(torch.fx.Interpreter):
    """Runs node by node so that a shape disagreement names the consumer that rejected it."""

    def __init__(self, gm: torch.fx.GraphModule, where: str) -> None:
        super().__init__(gm)
        self.where = where

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except VerificationError:
            raise
        except Exception as exc:
            shapes = [
                tuple(a.shape) for a in pytree.tree_leaves(self._inputs_of(n)) if isinstance(a, torch.Tensor)
            ]
            raise VerificationError(
                f"{self.where}: node {n.name!r} ({n.target}) fails on the example inputs with input shapes {shapes}: {exc}"
            ) from exc
        if isinstance(result, torch.Tensor):
            n.meta["val"] = torch.empty(result.shape, dtype=result.dtype, device="meta")
        return result

    def _inputs_of(self, n: torch.fx.Node) -> Any:
        return [self.env.get(a) for a in n.all_input_nodes]


def run_checked(gm: torch.fx.GraphModule, inputs: Sequence[Any], where: str = "graph") -> list[Any]:
    """Run ``gm`` on ``inputs`` node by node; refreshes shape metadata; returns flat outputs."""
    flat_inputs = pytree.tree_leaves(tuple(inputs))
    with torch.no_grad():
        out = _CheckingInterpreter(gm, where).run(*flat_inputs)
    return list(pytree.tree_leaves(out))


def assert_outputs_close(actual: list[Any], expected: list[Any], tolerance: float, what: str) -> float:
    """max |actual − expected| ≤ tolerance × max |expected| for every output tensor.

    Returns the largest of those ratios (0 when every output is equal or not a float tensor).
    """
    if len(actual) != len(expected):
        raise VerificationError(f"{what}: {len(actual)} outputs, expected {len(expected)}")
    worst = 0.0
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if not isinstance(e, torch.Tensor):
            if a != e:
                raise VerificationError(f"{what}: output {i} is {a!r}, expected {e!r}")
            continue
        if not isinstance(a, torch.Tensor) or a.shape != e.shape:
            got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise VerificationError(f"{what}: output {i} has shape {got}, expected {tuple(e.shape)}")
        if not e.is_floating_point():
            if not torch.equal(a, e):
                raise VerificationError(f"{what}: integer output {i} differs")
            continue
        error = float((a.double() - e.double()).abs().max()) if a.numel() else 0.0
        scale = max(float(e.abs().max()) if e.numel() else 0.0, 1e-6)
        if not error <= tolerance * scale:  # also catches NaN
            raise VerificationError(
                f"{what}: output {i} differs by {error:.3g} (allowed {tolerance:.1g} × output scale {scale:.3g})"
            )
        worst = max(worst, error / scale)
    return worst


class _Float64Interpreter(torch.fx.Interpreter):
    """Runs a graph with every floating weight, activation and dtype argument widened to float64."""

    def fetch_attr(self, target: str) -> Any:
        value = super().fetch_attr(target)
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            return value.clone()  # a training-mode graph counts batches in place: not in our run
        return _widen(value)

    def call_function(self, target: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        return super().call_function(target, *pytree.tree_map(_widen, (args, kwargs)))


def _widen(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.float64)
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return torch.float64
    return value


def run_float64(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> list[Any]:
    """Run ``gm`` in float64 without changing it (integer inputs stay integers); flat outputs."""
    flat_inputs = [_widen(x) for x in pytree.tree_leaves(tuple(inputs))]
    with torch.no_grad():
        out = _Float64Interpreter(gm).run(*flat_inputs)
    return list(pytree.tree_leaves(out))


@dataclass
class _Reference:
    """What exact passes must reproduce: a graph nobody edits, its float32 outputs, and its name."""

    source: str
    graph: torch.fx.GraphModule
    outputs: list[Any]
    wide: list[Any] | None = None  # its float64 outputs, computed the first time they are needed


@dataclass(frozen=True)
class PassCheck:
    """One passed output comparison: which pass, against what, the error, and in which precision."""

    pass_name: str
    reference: str  # "the pipeline input", "the masked reference of PruneBlocksPass", ...
    relative_error: float  # max |out − reference| / max |reference| over the outputs
    precision: str  # "float32", or "float64" when float32 rounding alone exceeded the tolerance


@dataclass
class VerifyInstrument(Instrument):
    """Lints and runs the input, then after every modifying pass: lint, shapes, declared numerics.

    Its only state is the current run's reference, made afresh by :meth:`before_pipeline`, so one
    instrument (and one PassManager) can verify any number of runs.
    """

    tolerance: float = 1e-5
    #: The comparisons of the current run, in pass order (the report shows them).
    checks: list[PassCheck] = field(default_factory=list, init=False)
    _reference: _Reference | None = field(default=None, init=False, repr=False)

    def wants_snapshot(self, pass_: PassBase) -> bool:
        return pass_.numerics == "masked"

    def before_pipeline(self, original: torch.fx.GraphModule, am: AnalysisManager) -> None:
        lint(am.gm, "input graph")
        outputs = run_checked(am.gm, am.example_inputs, "input graph")
        self._reference = _Reference("the pipeline input", original, outputs)
        self.checks = []

    def after_pass(
        self, pass_: PassBase, before: torch.fx.GraphModule | None, result: PassResult, am: AnalysisManager
    ) -> None:
        if not result.modified:
            return
        gm, where = result.graph_module, f"after {pass_.name}"
        lint(gm, where)
        outputs = run_checked(gm, am.example_inputs, where)
        if pass_.numerics == "exact":
            reference = self._current()
            error, precision = self._check(
                gm, outputs, reference, am, f"{where} (declared exact, vs {reference.source}"
            )
            self.checks.append(PassCheck(pass_.name, reference.source, error, precision))
        elif pass_.numerics == "masked":
            assert before is not None
            graph = pass_.masked_reference(before, gm, am.example_inputs)
            expected = run_checked(graph, am.example_inputs, f"{where} masked reference")
            masked = _Reference(f"the masked reference of {pass_.name}", graph, expected)
            error, precision = self._check(gm, outputs, masked, am, f"{where} (vs {masked.source}")
            self.checks.append(PassCheck(pass_.name, masked.source, error, precision))
            self._reference = masked
        else:
            self._reference = _Reference(f"the output of {pass_.name}", copy.deepcopy(gm), outputs)

    def _check(
        self,
        gm: torch.fx.GraphModule,
        outputs: list[Any],
        reference: _Reference,
        am: AnalysisManager,
        what: str,
    ) -> tuple[float, str]:
        """In float32 first; a failure is decided in float64, where only a real mistake remains.

        Returns the relative error and the precision that decided it.
        """
        try:
            return assert_outputs_close(
                outputs, reference.outputs, self.tolerance, f"{what}, in float32)"
            ), "float32"
        except VerificationError as narrow:
            try:
                if reference.wide is None:
                    reference.wide = run_float64(reference.graph, am.example_inputs)
                wide = run_float64(gm, am.example_inputs)
            except Exception as exc:  # an op without a float64 kernel, or a float32-only module
                raise VerificationError(f"{narrow}; float64 cannot decide: {_summary(exc)}") from exc
        error = assert_outputs_close(wide, reference.wide, self.tolerance, f"{what}, in float64)")
        log.info("%s: float32 rounding exceeded the tolerance, float64 agrees", what)
        return error, "float64"

    def _current(self) -> _Reference:
        if self._reference is None:
            raise VerificationError("VerifyInstrument used outside PassManager.run (no before_pipeline)")
        return self._reference


def _summary(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
