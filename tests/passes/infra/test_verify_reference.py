"""What exact passes are verified against: the pipeline input (or the last masked pass's claim),
in float32, and in float64 where float32 rounding alone exceeds the tolerance."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.fx
import torch.nn as nn

from tests.models import ConvBN, randomize_bn, tiny_bert
from tests.passes.infra.test_pass_manager import ScaleWeightClaimsExact
from tilefx.errors import VerificationError
from tilefx.graph_capture import capture
from tilefx.passes.infra import AnalysisManager, PassBase, PassManager, PassResult, run_checked
from tilefx.passes.infra.verify import run_float64
from tilefx.passes.metadata import Permutation, get_metadata
from tilefx.passes.prune_connections import PruneConnectionsPass
from tilefx.passes.reorder_dims import ReorderDimsPass, random_planner

TOLERANCE = 1e-5  # the PassManager's default


@dataclass(frozen=True)
class NudgesOutputClaimsExact(PassBase):
    """Shifts every output by ``fraction`` of the verifier's tolerance: each step alone passes."""

    fraction: float = 0.6

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        scale = float(run_checked(gm, am.example_inputs)[0].abs().max())
        with torch.no_grad():
            gm.get_parameter("fc.bias").add_(self.fraction * TOLERANCE * scale)
        return PassResult(gm, modified=True)


def _conv_bn() -> tuple[torch.fx.GraphModule, tuple[torch.Tensor]]:
    x = torch.randn(2, 3, 8, 8)
    return capture(randomize_bn(ConvBN()).eval(), (x,)), (x,)


def test_small_errors_of_exact_passes_cannot_add_up() -> None:
    gm, inputs = _conv_bn()
    assert PassManager([NudgesOutputClaimsExact()]).run(gm, inputs).modified  # 0.6 × tolerance: fine
    with pytest.raises(VerificationError, match="declared exact, vs the pipeline input, in float64") as info:
        PassManager([NudgesOutputClaimsExact(), NudgesOutputClaimsExact()]).run(gm, inputs)
    assert "passes run before it: NudgesOutputClaimsExact" in str(info.value)  # the second one fails


def test_a_masked_pass_moves_the_reference_of_later_exact_passes() -> None:
    gm, inputs = _conv_bn()
    prune = PruneConnectionsPass(sparsity=0.5, criterion="l1")
    result = PassManager([NudgesOutputClaimsExact(), prune, NudgesOutputClaimsExact()]).run(gm, inputs)
    assert result.ran == (
        ("NudgesOutputClaimsExact", True),
        ("PruneConnectionsPass", True),
        ("NudgesOutputClaimsExact", True),
    )


class IllConditioned(nn.Module):
    """A deep MLP whose outputs are tiny next to its activations (the head cancels them out).

    Any change of summation order moves its float32 outputs by far more than 1e-5 of their scale,
    so only a float64 comparison can tell a correct reordering from a wrong one.
    """

    def __init__(self, x: torch.Tensor, depth: int = 6, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(x.shape[1], width)]
        for _ in range(depth):
            layers += [nn.ReLU(), nn.Linear(width, width)]
        self.body = nn.Sequential(*layers, nn.ReLU())
        self.head = nn.Linear(width, 4)
        with torch.no_grad():
            features = self.body(x)
            self.head.bias.copy_(-(features @ self.head.weight.T).mean(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _ill_conditioned(depth: int = 6) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor]]:
    x = 1 + 1e-3 * torch.randn(8, 16)
    return capture(IllConditioned(x, depth).eval(), (x,)), (x,)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def test_a_correct_reordering_of_a_deep_ill_conditioned_model_is_accepted() -> None:
    gm, inputs = _ill_conditioned()
    result = PassManager([ReorderDimsPass(planner=random_planner(3))]).run(gm, inputs)
    assert result.modified
    reordered = result.graph_module
    in_float32 = _relative_error(run_checked(reordered, inputs)[0], run_checked(gm, inputs)[0])
    assert in_float32 > 10 * TOLERANCE  # float32 rounding alone would have failed the check
    assert _relative_error(run_float64(reordered, inputs)[0], run_float64(gm, inputs)[0]) < 1e-9


@dataclass(frozen=True)
class ReorderMissingOneConsumerIndex(PassBase):
    """A correct reordering, then two input channels of one consumer swapped back: a real bug."""

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        ReorderDimsPass(planner=random_planner(3)).run(gm, am)
        consumer = next(
            name
            for name, records in get_metadata(gm).params.items()
            if any(isinstance(r, Permutation) and r.dim == 1 for r in records)
        )
        weight = gm.get_parameter(consumer)
        with torch.no_grad():
            weight[:, [0, 1]] = weight[:, [1, 0]].clone()
        return PassResult(gm, modified=True)


def test_a_permutation_not_folded_into_one_consumer_index_is_caught() -> None:
    gm, inputs = _ill_conditioned()
    with pytest.raises(VerificationError, match="declared exact, vs the pipeline input, in float64"):
        PassManager([ReorderMissingOneConsumerIndex()]).run(gm, inputs)


def test_where_float64_cannot_run_the_float32_failure_stands_and_says_why() -> None:
    model = ConvBN().eval()
    x = torch.randn(2, 3, 8, 8)
    traced = torch.fx.symbolic_trace(model)  # calls float32 modules: no float64 run possible
    with pytest.raises(VerificationError, match=r"in float32\): .*float64 cannot decide: RuntimeError"):
        PassManager([ScaleWeightClaimsExact()]).run(traced, (x,))


def test_float64_run_widens_weights_and_dtype_arguments_but_not_integer_inputs() -> None:
    model = tiny_bert()
    ids = torch.randint(0, 50, (2, 7))
    gm = capture(model, (ids,))
    (hidden, *_) = run_float64(gm, (ids,))
    assert hidden.dtype == torch.float64
    torch.testing.assert_close(hidden.float(), model(ids).last_hidden_state, rtol=1e-4, atol=1e-5)
    assert gm.get_parameter("embeddings.word_embeddings.weight").dtype == torch.float32  # untouched


@dataclass(frozen=True)
class PruneThenReorder(PassBase):
    """Masked: zeroes the weakest half of one hidden layer's rows, then reorders every hidden dim.

    Exact in real arithmetic against :meth:`masked_reference` (the input with those rows zeroed),
    but the reordering changes float32 summation order. ``forget`` zeroes one more row than the
    pass claims: a real mistake.
    """

    forget: bool = False
    numerics = "masked"

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        _zero_weak_rows(gm, extra=self.forget)
        ReorderDimsPass(planner=random_planner(3)).run(gm, am)
        return PassResult(gm, modified=True)

    def masked_reference(
        self, before: torch.fx.GraphModule, after: torch.fx.GraphModule, example_inputs: object
    ) -> torch.fx.GraphModule:
        _zero_weak_rows(before, extra=False)
        return before


def _zero_weak_rows(gm: torch.fx.GraphModule, *, extra: bool) -> None:
    weight, bias = gm.get_parameter("body.2.weight"), gm.get_parameter("body.2.bias")
    rows = weight.abs().sum(1).argsort()[: weight.shape[0] // 2 + (1 if extra else 0)]
    with torch.no_grad():
        weight[rows] = 0
        bias[rows] = 0


def test_a_correct_masked_pass_with_float32_rounding_over_the_tolerance_is_accepted() -> None:
    gm, inputs = _ill_conditioned(depth=10)
    result = PassManager([PruneThenReorder()]).run(gm, inputs)
    reference = PruneThenReorder().masked_reference(copy.deepcopy(gm), result.graph_module, inputs)
    actual, expected = run_checked(result.graph_module, inputs)[0], run_checked(reference, inputs)[0]
    assert _relative_error(actual, expected) > 10 * TOLERANCE  # a constant fp32 tolerance would fail


def test_a_masked_pass_that_removes_more_than_it_claims_is_caught_in_float64() -> None:
    gm, inputs = _ill_conditioned(depth=10)
    with pytest.raises(VerificationError, match="vs the masked reference of PruneThenReorder, in float64"):
        PassManager([PruneThenReorder(forget=True)]).run(gm, inputs)
