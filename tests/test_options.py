"""The one option schema: checks derived from annotations, rules across fields, nested option sets,
and the recipe parts handed to their passes as they are."""

from __future__ import annotations

from typing import Literal

import pytest
import torch

import tilefx
from tilefx.errors import RecipeError
from tilefx.options import choices, nested, option, options
from tilefx.passes.criteria import Criterion, criteria, criterion, register_criterion
from tilefx.passes.criteria.magnitude import L1
from tilefx.passes.recover_sparsity import RecoverSparsityPass
from tilefx.passes.train_dsm_prior import TrainDSMPriorPass
from tilefx.passes.training.calibration import Calibration
from tilefx.passes.training.loop import LoopOptions
from tilefx.pipeline import default_pipeline

ORDER: list[str] = []


@options
class Inner:
    lr: float = option(default=0.1, gt=0)


@options
class Base:
    steps: int = option(ge=0)
    mode: Literal["a", "b"] = "a"
    pair: tuple[int, int] = (1, 2)
    inner: Inner | None = None

    def check(self) -> None:
        ORDER.append("Base")
        if self.steps == 13:
            raise RecipeError("Base.steps: 13 is unlucky")


@options
class Derived(Base):
    steps: int = option(default=5, ge=0)
    share: float | None = option(default=None, ge=0, lt=1)

    def check(self) -> None:
        ORDER.append("Derived")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": -1}, r"Derived.steps must be an integer >= 0, got -1"),
        ({"steps": 1.5}, r"Derived.steps must be an integer, got float 1.5"),
        ({"steps": True}, r"Derived.steps must be an integer, got bool True"),
        ({"mode": "c"}, r"Derived.mode must be one of 'a', 'b'; got 'c'"),
        ({"pair": (1,)}, r"Derived.pair must be a tuple of 2 integers"),
        ({"share": 1.0}, r"Derived.share must be a number in \[0, 1\), got 1.0"),
        ({"share": "x"}, r"Derived.share must be a number or None, got str 'x'"),
        ({"stepz": 1}, r"Derived: unknown option 'stepz'; did you mean 'steps'\?"),
        ({"inner": {"lr": 0}}, r"Derived.inner.lr must be a number > 0, got 0"),
        ({"inner": {"lrr": 1}}, r"Derived.inner: unknown option 'lrr'; did you mean 'lr'\?"),
        ({"steps": 13}, r"Base.steps: 13 is unlucky"),
    ],
)
def test_every_field_is_checked_from_its_annotation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        Derived(**kwargs)  # type: ignore[arg-type]


def test_lists_and_mappings_become_tuples_and_options_and_rules_run_base_first() -> None:
    ORDER.clear()
    value = Derived(pair=[3, 4], inner={"lr": 0.5})  # type: ignore[arg-type]
    assert value.pair == (3, 4) and value.inner == Inner(lr=0.5)
    assert ORDER == ["Base", "Derived"]
    assert Derived().steps == 5 and choices(Literal["x", "y"] | None) == ("x", "y", None)
    with pytest.raises(RecipeError, match=r"Outer.part.lr must be a number > 0"):
        nested("Outer.part", Inner, {"lr": -1.0})


def test_an_options_class_states_its_rules_in_check_not_post_init() -> None:
    with pytest.raises(TypeError, match="check"):

        @options
        class Bad:
            x: int = 0

            def __post_init__(self) -> None:
                pass


def test_recovery_is_the_loop_options_and_reaches_its_pass_unchanged() -> None:
    recovery = tilefx.Recovery(steps=3, lr=1e-3, schedule="oneshot", reconstruct=2, progress=False)
    assert isinstance(recovery, LoopOptions)
    data = Calibration([(torch.randn(2, 8), None)])
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(4, 1), sparsity=0.5), recovery=recovery)
    recover = [p for p in default_pipeline(recipe, data) if isinstance(p, RecoverSparsityPass)]
    assert len(recover) == 1 and recover[0].recovery is recovery
    prior = tilefx.DirichletScaleMixture(steps=2, progress=False)
    trainer = [
        p for p in default_pipeline(tilefx.Recipe(prior=prior), data) if isinstance(p, TrainDSMPriorPass)
    ]
    assert len(trainer) == 1 and trainer[0].prior is prior and isinstance(prior, LoopOptions)


def test_the_recipe_the_optimizer_and_the_pipeline_read_one_catalogue() -> None:
    assert set(criteria(public=True)) == {"l1", "l2", "bn_scale", "taylor", "dcp", "vrpge"}
    assert criterion("dcp").options_type is tilefx.DCPOptions and criterion("dcp").needs_calibration
    assert criterion("bn_scale").reads_batch_norms and criterion("vrpge").trains_structure
    with pytest.raises(RecipeError, match="ChannelPruning.criterion must be one of"):
        tilefx.ChannelPruning(criterion="mine")
    register_criterion(Criterion("mine", L1.score))
    try:
        assert tilefx.ChannelPruning(criterion="mine").criterion == "mine"
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
        x = torch.randn(3, 4)
        pruned = tilefx.optimize(model, (x,), tilefx.Recipe(channels=tilefx.ChannelPruning(0.5, "mine")))
        assert pruned.get_parameter("0.weight").shape[0] == 4
    finally:
        from tilefx.passes.criteria import _CATALOGUE

        _CATALOGUE.pop("mine")
