"""Verification tells exact from wrong: correct work passes, a real mistake is caught.

On all-MiniLM-L6-v2 with its pretrained weights and realistic batches (up to 32 × 128 tokens),
every recipe the README shows must pass verification: a permutation folded into six layers is
exact in real arithmetic, so fp32 summation-order noise must not fail it. A permutation with one
swapped index left out of its consumer is a real mistake and must still be caught, on a small
generated model and on MiniLM, in the layer where a swap changes the output least.
The 32 × 128 sweep runs in ``make test-slow`` (about 14 minutes); 16 × 32, the issue's batch,
in ``make test``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

import tilefx
from tests.graph_properties import Ran
from tests.random_models import Act, Linear, ModelSpec, build
from tilefx.errors import VerificationError
from tilefx.graph_capture import capture
from tilefx.passes.graph_utils import attr_tensor, set_attr_tensor
from tilefx.passes.infra import AnalysisManager, PassBase, PassManager, PassResult
from tilefx.passes.training.calibration import Calibration, first_tensor
from tilefx.zoo import SENTENCES, MiniLM, load_minilm

README_RECIPES: dict[str, tilefx.Recipe] = {
    "default": tilefx.Recipe(),
    "default blocks": tilefx.Recipe(blocks=tilefx.BlockPruning()),
    "headline": tilefx.Recipe(
        channels=tilefx.ChannelPruning(ratio=0.3),
        blocks=tilefx.BlockPruning(block=(16, 1), sparsity=0.8, reorder="tetris"),
    ),
    "demo": tilefx.Recipe(blocks=tilefx.BlockPruning(block=(16, 1), sparsity=0.8, tetris="faithful")),
    "cli tables": tilefx.Recipe(
        channels=tilefx.ChannelPruning(), connections=tilefx.ConnectionPruning(), blocks=tilefx.BlockPruning()
    ),
}
DCP_RECIPE = tilefx.Recipe(
    channels=tilefx.ChannelPruning(ratio=0.3, criterion="dcp", options=tilefx.DCPOptions(epsilon=0.01))
)


@dataclass(frozen=True)
class SwapWithoutFoldingPass(PassBase):
    """Swaps output channels ``i`` and ``j`` of one layer and forgets its consumer: wrong, declared exact."""

    weight: str
    bias: str | None
    i: int
    j: int

    numerics: ClassVar = "exact"

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        order = torch.arange(attr_tensor(gm, self.weight).shape[0])
        order[[self.i, self.j]] = order[[self.j, self.i]]
        for name in (self.weight, self.bias):
            if name is not None:
                set_attr_tensor(gm, name, attr_tensor(gm, name).detach().index_select(0, order).clone())
        return PassResult(gm, modified=True)


def _least_visible_swap(consumer: torch.Tensor) -> tuple[int, int]:
    """The two input channels whose consumer columns are closest: swapping them changes the least."""
    columns = consumer.detach().double().T
    distance = torch.cdist(columns, columns)
    distance.fill_diagonal_(float("inf"))
    flat = int(distance.argmin())
    return flat // distance.shape[0], flat % distance.shape[0]


def test_a_swap_left_out_of_the_consumer_is_caught_on_a_generated_model() -> None:
    spec = ModelSpec(image=False, channels=8, size=4, first=(Linear(16), Act("gelu"), Linear(8)), seed=3)
    model, inputs = build(spec)
    gm = capture(model, inputs)
    i, j = _least_visible_swap(gm.get_parameter("first.2.weight"))
    wrong = SwapWithoutFoldingPass("first.0.weight", "first.0.bias", i, j)
    with pytest.raises(VerificationError, match="declared exact"):
        PassManager([wrong], verify=True).run(gm, inputs)


# ----------------------------------------------------------------------------------------------
# MiniLM (slow: real weights, up to 32 × 128 tokens)


@pytest.fixture(scope="module")
def minilm() -> Iterator[MiniLM]:
    pytest.importorskip("all_minilm_l6_v2")
    yield load_minilm()


def _inputs(minilm: MiniLM, sentences: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sentences`` real sentences padded to ``tokens`` (as the issue's 16 × 32 batch), or, where
    one sentence is far shorter than ``tokens``, texts of several sentences that fill every token."""
    rotated = [SENTENCES[i % len(SENTENCES) :] + SENTENCES[: i % len(SENTENCES)] for i in range(sentences)]
    texts = [r[0] if tokens <= 32 else " ".join(r * 2) for r in rotated]
    encoded = minilm.tokenizer(
        texts, padding="max_length", truncation=True, max_length=tokens, return_tensors="pt"
    )
    return encoded["input_ids"], encoded["attention_mask"]


def _optimize(
    minilm: MiniLM, inputs: tuple[torch.Tensor, ...], recipe: tilefx.Recipe, calibration: object = None
) -> list[tuple[str, bool]]:
    ran = Ran()
    tilefx.optimize(minilm.model, inputs, recipe=recipe, calibration=calibration, instruments=[ran])
    return ran.passes


@pytest.mark.exhaustive  # the "headline" recipe (channels + TETRIS) grew one worker past 16 GB here
@pytest.mark.parametrize(
    "batch",
    [
        pytest.param((16, 32), id="16x32"),
        pytest.param((32, 128), id="32x128"),  # ~14 min for all recipes
    ],
)
@pytest.mark.parametrize("name", list(README_RECIPES))
def test_readme_recipes_pass_verification_on_minilm(
    minilm: MiniLM, name: str, batch: tuple[int, int]
) -> None:
    ran = _optimize(minilm, _inputs(minilm, *batch), README_RECIPES[name])
    assert ran, "the pipeline ran no pass"  # each recorded pass ran and passed verification


@pytest.mark.slow
def test_readme_dcp_recipe_passes_verification_on_minilm(minilm: MiniLM) -> None:
    """DCP learns from labelled batches; for an encoder the labels are the dense model's own outputs."""
    inputs = _inputs(minilm, 16, 32)
    with torch.no_grad():
        teacher = minilm.model(*inputs).last_hidden_state
    calibration = Calibration([(inputs, teacher)], loss=lambda out, y: F.mse_loss(first_tensor(out), y))
    ran = _optimize(minilm, inputs, DCP_RECIPE, calibration)
    assert ("PruneChannelsPass", True) in ran


@pytest.mark.slow
@pytest.mark.parametrize("layer", [0, 5])
def test_a_swap_left_out_of_the_consumer_is_caught_on_minilm(minilm: MiniLM, layer: int) -> None:
    inputs = _inputs(minilm, 32, 128)
    gm = capture(minilm.model, inputs)
    prefix = f"encoder.layer.{layer}"
    i, j = _least_visible_swap(gm.get_parameter(f"{prefix}.output.dense.weight"))
    wrong = SwapWithoutFoldingPass(
        f"{prefix}.intermediate.dense.weight", f"{prefix}.intermediate.dense.bias", i, j
    )
    with pytest.raises(VerificationError, match="declared exact"):
        PassManager([wrong], verify=True).run(gm, inputs)
