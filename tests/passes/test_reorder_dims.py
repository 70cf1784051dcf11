"""ReorderDimsPass: folded permutations are exact on residual, concat and attention models."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn

from tests.models import randomize_bn, tiny_bert
from tests.passes.test_prune_channels import Concat, Grouped, Residual
from tilefx.errors import RecipeError
from tilefx.graph_capture import capture
from tilefx.passes.analysis.tetris_planner import TetrisPlanner
from tilefx.passes.fold_batchnorm import FoldBatchNormPass
from tilefx.passes.infra import PassManager
from tilefx.passes.metadata import Permutation, get_metadata
from tilefx.passes.reorder_dims import ReorderDimsPass, random_planner


def _reorder(model: nn.Module, inputs: tuple[torch.Tensor, ...], **options: object) -> torch.fx.GraphModule:
    gm = capture(model.eval(), inputs)
    result = PassManager([FoldBatchNormPass(), ReorderDimsPass(**options)]).run(gm, inputs)  # type: ignore[arg-type]
    assert result.ran[-1] == ("ReorderDimsPass", True)
    return result.graph_module


@pytest.mark.parametrize(
    "make", [lambda: randomize_bn(Residual()), Concat, Grouped], ids=["residual", "concat", "grouped"]
)
def test_random_reorder_is_exact_and_records_bijections(make: object) -> None:
    model = make()  # type: ignore[operator]
    x = torch.randn(2, 3, 8, 8)
    gm = _reorder(model, (x,), planner=random_planner(1))
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)  # also checked by the verifier
    permutations = [
        a for anns in get_metadata(gm).params.values() for a in anns if isinstance(a, Permutation)
    ]
    assert permutations and all(sorted(p.order) == list(range(len(p.order))) for p in permutations)


def test_residual_group_shares_one_permutation() -> None:
    model = randomize_bn(Residual())
    x = torch.randn(1, 3, 8, 8)
    order = [3, 0, 7, 1, 6, 2, 5, 4]
    gm = _reorder(model, (x,), orders={"stem.weight": order})
    metadata = get_metadata(gm)
    for target, dim in (("stem.weight", 0), ("a.3.weight", 0), ("a.0.weight", 1), ("head.weight", 1)):
        assert metadata.of(target, Permutation)[0] == Permutation(dim, tuple(order))
    torch.testing.assert_close(gm.get_parameter("stem.weight"), model.stem.weight[order])


def test_transformer_block_reorder_is_exact() -> None:
    model = tiny_bert()
    ids = torch.randint(0, 50, (2, 7))
    gm = _reorder(model, (ids,), planner=random_planner(2))
    torch.testing.assert_close(
        gm(ids)["last_hidden_state"], model(ids).last_hidden_state, rtol=1e-5, atol=1e-5
    )
    assert get_metadata(gm).of("encoder.layer.0.intermediate.dense.weight", Permutation)


def test_second_run_without_orders_is_unmodified_and_bad_orders_are_rejected() -> None:
    model = Residual()
    x = torch.randn(1, 3, 8, 8)
    gm = capture(model.eval(), (x,))
    assert not PassManager([ReorderDimsPass()]).run(gm, (x,)).modified
    with pytest.raises(RecipeError, match="permutation of range"):
        PassManager([ReorderDimsPass(orders={"stem.weight": [0, 0, 1, 2, 3, 4, 5, 6]})]).run(gm, (x,))
    with pytest.raises(RecipeError, match="no channel group"):
        PassManager([ReorderDimsPass(orders={"nope.weight": [0]})]).run(gm, (x,))
    with pytest.raises(RecipeError, match="model output"):
        PassManager([ReorderDimsPass(orders={"head.weight": [1, 0, 2, 3, 4]})]).run(gm, (x,))


def test_tetris_planner_draws_its_bars_only_on_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_bert()
    ids = torch.randint(0, 50, (2, 7))
    gm = capture(model.eval(), (ids,))
    ReorderDimsPass(planner=TetrisPlanner((4, 1), 0.5))(gm, example_inputs=(ids,))
    assert "TETRIS" not in capsys.readouterr().err  # pytest's stderr is not a terminal: no bar, no print
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    quiet = TetrisPlanner((4, 1), 0.5, progress=False)
    ReorderDimsPass(planner=quiet)(capture(model.eval(), (ids,)), example_inputs=(ids,))
    assert "TETRIS" not in capsys.readouterr().err
    ReorderDimsPass(planner=TetrisPlanner((4, 1), 0.5))(capture(model.eval(), (ids,)), example_inputs=(ids,))
    err = capsys.readouterr().err
    assert "TETRIS starts" in err and "TETRIS EM" in err
