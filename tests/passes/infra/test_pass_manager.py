"""Contract of the pass infrastructure: honest modified flags, analysis caching, error wrapping,
a stateless manager that never touches its input, passes callable on their own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.fx

from tests.models import ConvBN, LinearBN, randomize_bn
from tilefx.errors import PassError, UnsupportedOpError, VerificationError
from tilefx.graph_capture import capture
from tilefx.passes.analysis.shapes import Shapes
from tilefx.passes.cleanup import EliminateDeadCodePass
from tilefx.passes.fold_batchnorm import FoldBatchNormPass
from tilefx.passes.infra import (
    AnalysisManager,
    DumpGraphInstrument,
    Numerics,
    PassBase,
    PassManager,
    PassResult,
    PipelineResult,
    TimingInstrument,
)
from tilefx.passes.metadata import get_metadata


def _captured() -> tuple[torch.fx.GraphModule, tuple[torch.Tensor]]:
    x = torch.randn(2, 3, 8, 8)
    return capture(ConvBN().eval(), (x,)), (x,)


@dataclass(frozen=True)
class LiesUnmodified(PassBase):
    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        with torch.no_grad():
            gm.get_parameter("fc.weight").mul_(2)
        return PassResult(gm, modified=False)


@dataclass(frozen=True)
class LiesModified(PassBase):
    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        return PassResult(gm, modified=True)


@dataclass(frozen=True)
class ScaleWeightClaimsExact(PassBase):
    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        with torch.no_grad():
            gm.get_parameter("fc.weight").mul_(1.01)
        return PassResult(gm, modified=True)


@dataclass(frozen=True)
class ScaleFcIfPresentClaimsExact(PassBase):
    """Wrong on models with an ``fc`` layer, a no-op on the others."""

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        if not any(name == "fc.weight" for name, _ in gm.named_parameters()):
            return PassResult(gm, modified=False)
        return ScaleWeightClaimsExact().run(gm, am)


@dataclass(frozen=True)
class ZeroRowClaimsMasked(PassBase):
    """Zeroes fc row 0 but tells the verifier nothing (metadata empty): the check must fail."""

    numerics: ClassVar[Numerics] = "masked"

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        with torch.no_grad():
            gm.get_parameter("fc.weight")[0].zero_()
        return PassResult(gm, modified=True)


@dataclass(frozen=True)
class Raises(PassBase):
    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        raise UnsupportedOpError("no handler for aten.frobnicate", node="frob")


@dataclass(frozen=True)
class UsesShapes(PassBase):
    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        am.get(Shapes())
        return PassResult(gm, modified=False)


def test_real_passes_report_modified_honestly_and_second_run_is_unmodified() -> None:
    gm, inputs = _captured()
    result = PassManager([FoldBatchNormPass(), EliminateDeadCodePass()] * 2).run(gm, inputs)
    assert result.ran == (
        ("FoldBatchNormPass", True),
        ("EliminateDeadCodePass", True),
        ("FoldBatchNormPass", False),
        ("EliminateDeadCodePass", False),
    )


@pytest.mark.parametrize("liar", [LiesUnmodified(), LiesModified()])
def test_dishonest_modified_flag_is_caught(liar: PassBase) -> None:
    gm, inputs = _captured()
    with pytest.raises(PassError, match="reported modified="):
        PassManager([liar]).run(gm, inputs)


def test_exact_pass_that_changes_numerics_fails_verification() -> None:
    gm, inputs = _captured()
    with pytest.raises(VerificationError, match="declared exact"):
        PassManager([ScaleWeightClaimsExact()]).run(gm, inputs)


def test_masked_pass_must_match_its_claimed_masked_model() -> None:
    gm, inputs = _captured()
    with pytest.raises(VerificationError, match="masked reference"):
        PassManager([ZeroRowClaimsMasked()]).run(gm, inputs)


def test_failure_is_wrapped_with_pass_context_and_keeps_its_type() -> None:
    gm, inputs = _captured()
    with pytest.raises(UnsupportedOpError) as info:
        PassManager([FoldBatchNormPass(), Raises()]).run(gm, inputs)
    assert isinstance(info.value, PassError)
    assert info.value.pass_name == "Raises"
    assert info.value.previous == ["FoldBatchNormPass"]
    assert info.value.node == "frob"
    assert "passes run before it: FoldBatchNormPass" in str(info.value)


def test_analyses_are_cached_and_invalidated_after_a_modifying_pass() -> None:
    gm, inputs = _captured()
    am = AnalysisManager(gm, inputs)
    first = am.get(Shapes())
    assert am.get(Shapes()) is first and am.computed == 1
    am.update(gm, preserved=frozenset({Shapes}))
    assert am.cached(Shapes())
    am.update(gm)
    assert not am.cached(Shapes())
    assert am.get(Shapes()) == first and am.computed == 2


def test_pass_manager_invalidates_only_after_modification() -> None:
    gm, inputs = _captured()
    seen: list[int] = []

    @dataclass(frozen=True)
    class Count(PassBase):
        def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
            am.get(Shapes())
            seen.append(am.computed)
            return PassResult(gm, modified=False)

    PassManager([Count(), Count(), FoldBatchNormPass(), Count()]).run(gm, inputs)
    assert seen == [1, 1, 2]


def test_shapes_analysis_reports_node_shapes() -> None:
    gm, inputs = _captured()
    shapes = AnalysisManager(gm, inputs).get(Shapes())
    assert shapes["conv2d"] == (2, 8, 8, 8)
    assert shapes["linear"] == (2, 4)


def test_timing_and_dump_instruments(tmp_path: Path) -> None:
    gm, inputs = _captured()
    timing = TimingInstrument()
    PassManager([FoldBatchNormPass(), EliminateDeadCodePass()], [timing, DumpGraphInstrument(tmp_path)]).run(
        gm, inputs
    )
    assert [(t.name, t.modified) for t in timing.timings] == [
        ("FoldBatchNormPass", True),
        ("EliminateDeadCodePass", True),
    ]
    assert all(t.seconds >= 0 for t in timing.timings)
    dumped = sorted(p.name for p in tmp_path.iterdir())
    assert dumped == ["000_FoldBatchNormPass.py", "001_EliminateDeadCodePass.py"]
    assert "batch_norm" not in (tmp_path / dumped[0]).read_text()


def test_stale_forward_is_a_verification_error() -> None:
    gm, inputs = _captured()

    @dataclass(frozen=True)
    class ForgetsRecompile(PassBase):
        def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
            relu = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.relu.default)
            relu.replace_all_uses_with(relu.args[0])
            gm.graph.erase_node(relu)
            return PassResult(gm, modified=True)

    with pytest.raises(VerificationError, match="recompile"):
        PassManager([ForgetsRecompile()]).run(gm, inputs)


def test_shape_disagreement_names_the_consumer() -> None:
    gm, inputs = _captured()

    @dataclass(frozen=True)
    class ShrinksProducerOnly(PassBase):
        numerics: ClassVar[Numerics] = "unchecked"

        def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
            conv = gm.get_submodule("conv")
            conv.weight = torch.nn.Parameter(conv.weight[:4].clone())
            return PassResult(gm, modified=True)

    with pytest.raises(VerificationError, match="node 'batch_norm'"):
        PassManager([ShrinksProducerOnly()]).run(gm, inputs)


def test_unverified_pipeline_still_checks_honesty_but_not_numerics() -> None:
    gm, inputs = _captured()
    manager = PassManager.__new__(PassManager)  # the suite's conftest forces verify=True in __init__
    manager.passes, manager.instruments, manager.verifier = [ScaleWeightClaimsExact()], [], None
    result = manager.run(gm, inputs)
    assert result.modified and result.checks == ()


def test_a_reused_manager_verifies_each_run_against_its_own_input() -> None:
    manager = PassManager([FoldBatchNormPass(), EliminateDeadCodePass(), ScaleFcIfPresentClaimsExact()])
    linear = randomize_bn(LinearBN()).eval()
    x = torch.randn(4, 6)
    first = manager.run(capture(linear, (x,)), (x,))
    torch.testing.assert_close(first.graph_module(x), linear(x), rtol=1e-5, atol=1e-5)
    gm, inputs = _captured()  # another model, other input shapes: the first run's reference is gone
    with pytest.raises(VerificationError, match="ScaleFcIfPresentClaimsExact.*vs the pipeline input"):
        manager.run(gm, inputs)
    again = manager.run(capture(linear, (x,)), (x,))
    assert again.ran == first.ran


def _state(gm: torch.fx.GraphModule) -> dict[str, bytes]:
    return {k: v.detach().numpy().tobytes() for k, v in gm.state_dict().items()}


def test_run_never_mutates_its_input() -> None:
    gm, inputs = _captured()
    code, state, metadata = gm.code, _state(gm), get_metadata(gm)
    result: PipelineResult = PassManager([FoldBatchNormPass(), EliminateDeadCodePass()]).run(gm, inputs)
    assert result.modified and result.graph_module is not gm
    assert "batch_norm" in gm.code and "batch_norm" not in result.graph_module.code
    assert gm.code == code and _state(gm) == state and get_metadata(gm) == metadata
    assert PassManager([FoldBatchNormPass()]).run(gm, inputs).modified  # the same input, again


def test_a_pass_is_callable_alone_like_torch_fx_passes() -> None:
    model = randomize_bn(ConvBN()).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,))
    result = FoldBatchNormPass()(gm)  # no manager: an analysis manager is made for it, gm edited in place
    assert isinstance(result, PassResult) and result.modified and result.graph_module is gm
    assert "batch_norm" not in gm.code
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    assert not FoldBatchNormPass()(gm).modified
    assert not UsesShapes()(gm, example_inputs=(x,)).modified  # example inputs for shape analyses
    with pytest.raises(VerificationError, match="needs example inputs"):
        UsesShapes()(gm)
