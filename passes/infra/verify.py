"""Verification between passes: graph lint, shapes re-propagated on example inputs, numerics.

On by default in every pipeline and always on in tests. A pass declared exact must reproduce the
outputs of the model it was given; a masked pass must reproduce its own ``masked_reference``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from .errors import VerificationError
from .instruments import Instrument
from .pass_base import PassBase, PassResult

if TYPE_CHECKING:
    from .analysis_manager import AnalysisManager

__all__ = ["VerifyInstrument", "assert_outputs_close", "lint", "run_checked"]


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


def assert_outputs_close(actual: list[Any], expected: list[Any], tolerance: float, what: str) -> None:
    """max |actual − expected| ≤ tolerance × max |expected| for every output tensor."""
    if len(actual) != len(expected):
        raise VerificationError(f"{what}: {len(actual)} outputs, expected {len(expected)}")
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


@dataclass
class VerifyInstrument(Instrument):
    """After every modifying pass: lint, shapes, and the numerics the pass declared."""

    tolerance: float = 1e-5
    _reference: list[Any] | None = None

    def wants_snapshot(self, pass_: PassBase) -> bool:
        return pass_.numerics == "masked"

    def before_pass(self, pass_: PassBase, gm: torch.fx.GraphModule, am: AnalysisManager) -> None:
        if self._reference is None:
            lint(gm, "input graph")
            self._reference = run_checked(gm, am.example_inputs, "input graph")

    def after_pass(
        self, pass_: PassBase, before: torch.fx.GraphModule | None, result: PassResult, am: AnalysisManager
    ) -> None:
        if not result.modified:
            return
        gm, where = result.graph_module, f"after {pass_.name}"
        lint(gm, where)
        outputs = run_checked(gm, am.example_inputs, where)
        if pass_.numerics == "exact":
            assert self._reference is not None
            assert_outputs_close(outputs, self._reference, self.tolerance, f"{where} (declared exact)")
        elif pass_.numerics == "masked":
            assert before is not None
            reference = pass_.masked_reference(before, gm)
            expected = run_checked(reference, am.example_inputs, f"{where} masked reference")
            assert_outputs_close(outputs, expected, self.tolerance, f"{where} (vs its masked reference)")
        self._reference = outputs
