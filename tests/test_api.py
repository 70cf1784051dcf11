"""The front door: optimize() never mutates the caller's model; recipes reject bad options."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import tilefx
from tests.models import ConvBN, randomize_bn


def _state(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in model.state_dict().items()}


def test_optimize_returns_verified_graph_and_leaves_model_byte_identical() -> None:
    model = randomize_bn(ConvBN(bias=True)).train()
    before = _state(model)
    x = torch.randn(2, 3, 8, 8)
    gm = tilefx.optimize(model, (x,))
    assert _state(model) == before
    assert model.training and model.bn.training
    model.eval()
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    assert tilefx.passes.metadata.get_metadata(gm).recipe == tilefx.Recipe()


def test_optimize_rejects_nan_weights_naming_the_parameter() -> None:
    model = ConvBN().eval()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(tilefx.CaptureError, match="'fc.weight' has 1 non-finite"):
        tilefx.optimize(model, (torch.randn(1, 3, 8, 8),))


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: tilefx.Recipe(chanels=tilefx.ChannelPruning()), "chanels"),
        (lambda: tilefx.ChannelPruning(ratio=1.0), "ratio"),
        (lambda: tilefx.ChannelPruning(ratio=-0.1), "ratio"),
        (lambda: tilefx.ChannelPruning(criterion="magic"), "criterion"),
        (lambda: tilefx.ChannelPruning(round_to=0), "round_to"),
        (lambda: tilefx.ConnectionPruning(sparsity=1.0), "sparsity"),
        (lambda: tilefx.BlockPruning(block=(0, 4)), "block"),
        (lambda: tilefx.BlockPruning(block=(16,)), "block"),
        (lambda: tilefx.BlockPruning(reorder="random"), "reorder"),
        (lambda: tilefx.Recipe(channels=0.3), "channels"),
        (lambda: tilefx.Recipe(tolerance=0), "tolerance"),
        (lambda: tilefx.Recipe(skip="aten.add"), "skip"),
    ],
)
def test_bad_recipe_values_raise_value_error_naming_the_field(make: object, field: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        make()  # type: ignore[operator]
    assert isinstance(info.value, tilefx.RecipeError)


def test_recipe_from_dict_builds_sections_and_rejects_unknown_keys() -> None:
    recipe = tilefx.Recipe.from_dict({"blocks": {"block": [16, 1], "sparsity": 0.9}, "skip": ["aten.foo"]})
    assert recipe.blocks == tilefx.BlockPruning(block=(16, 1), sparsity=0.9)
    assert recipe.skip == ("aten.foo",)
    with pytest.raises(tilefx.RecipeError, match="spasity"):
        tilefx.Recipe.from_dict({"blocks": {"spasity": 0.9}})


def test_not_a_recipe_is_rejected() -> None:
    with pytest.raises(tilefx.RecipeError, match="Recipe"):
        tilefx.optimize(ConvBN(), (torch.randn(1, 3, 8, 8),), recipe={"channels": None})  # type: ignore[arg-type]


def test_importing_the_passes_does_not_import_tvm() -> None:
    code = "import sys, tilefx, tilefx.passes, tilefx.passes.infra; assert 'tvm' not in sys.modules, 'tvm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_user_pipeline_can_be_edited_as_a_list() -> None:
    from tilefx.passes.cleanup import EliminateDeadCodePass

    model = randomize_bn(ConvBN()).eval()
    x = torch.randn(1, 3, 8, 8)
    passes = [p for p in tilefx.default_pipeline(tilefx.Recipe()) if not isinstance(p, EliminateDeadCodePass)]
    gm = tilefx.optimize(model, (x,), passes=passes)
    assert "bn" in dict(gm.named_children())  # BN state kept: cleanup was taken out of the list
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_channel_recipe_shrinks_the_model_through_optimize() -> None:
    model = randomize_bn(ConvBN()).eval()
    x = torch.randn(1, 3, 8, 8)
    before = _state(model)
    gm = tilefx.optimize(model, (x,), recipe=tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5)))
    assert gm.get_parameter("conv.weight").shape[0] == 4
    assert gm.get_parameter("fc.weight").shape == (4, 4)
    assert _state(model) == before


def test_criteria_that_read_batch_norm_scales_run_before_folding() -> None:
    from tilefx.passes.fold_batchnorm import FoldBatchNormPass
    from tilefx.passes.prune_connections import PruneConnectionsPass

    recipe = tilefx.Recipe(connections=tilefx.ConnectionPruning(sparsity=0.5))
    kinds = [type(p) for p in tilefx.default_pipeline(recipe)]
    assert kinds.index(PruneConnectionsPass) < kinds.index(FoldBatchNormPass)
    recipe = tilefx.Recipe(connections=tilefx.ConnectionPruning(sparsity=0.5, criterion="l1"))
    kinds = [type(p) for p in tilefx.default_pipeline(recipe)]
    assert kinds.index(PruneConnectionsPass) > kinds.index(FoldBatchNormPass)
