"""Recipe(prior=DirichletScaleMixture(...)): train under the DSM prior, prune by |w|, compile, run."""

from __future__ import annotations

import tomllib

import pytest
import torch
import torch.nn as nn

import tilefx
from tilefx.lowering.build import lowering_choices
from tilefx.passes.metadata import BlockSparsity, get_metadata
from tilefx.passes.train_dsm_prior import TrainDSMPriorPass
from tilefx.passes.training.calibration import Calibration


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _batches(count: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        x = torch.randn(8, 12, generator=generator)
        out.append((x, (x[:, :3] - x[:, 3:6]).argmax(1)))  # only inputs 0-5 matter
    return out


def _prior(**options: object) -> tilefx.DirichletScaleMixture:
    return tilefx.DirichletScaleMixture(**{"steps": 20, "sparsity": 0.8, "progress": False, **options})  # type: ignore[arg-type]


def _records(gm: torch.fx.GraphModule) -> dict[str, BlockSparsity]:
    return {
        name: records[-1]
        for name, records in get_metadata(gm).params.items()
        if records and isinstance(records[-1], BlockSparsity)
    }


@pytest.mark.parametrize("kind", ["horseshoe", "student_t"])
def test_prior_trains_prunes_exactly_and_compiles(kind: str) -> None:
    model, x = MLP(), torch.randn(8, 12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = tilefx.optimize(model, (x,), tilefx.Recipe(prior=_prior(kind=kind)), calibration=_batches())
    records = _records(gm)
    assert set(records) == {"fc1.weight"}  # the first linear only, by default
    weight = gm.get_parameter("fc1.weight").detach()
    assert records["fc1.weight"].block == (1, 1)
    assert int(records["fc1.weight"].mask.sum()) == round(0.2 * weight.numel())  # sparsity exactly
    assert torch.count_nonzero(weight) <= round(0.2 * weight.numel())
    assert not torch.equal(gm.get_parameter("fc2.weight"), model.fc2.weight)  # the whole model trained
    for name, value in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(value, before[name])

    masked = MLP()  # the torch model the records claim: trained weights, pruned ones zeroed
    masked.load_state_dict({k: gm.get_parameter(k).detach() for k in before})
    with torch.no_grad():
        masked.fc1.weight.mul_(records["fc1.weight"].element_mask(masked.fc1.weight.shape))
    compiled = tilefx.compile(gm, target="llvm", fallback="never")
    assert [c.lowered for c in lowering_choices(compiled)] == [True]  # fc1 runs as a BSR kernel
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), masked(x), rtol=1e-4, atol=1e-4)


def test_named_layers_and_a_regression_loss() -> None:
    model, x = MLP(), torch.randn(8, 12)
    data = Calibration(
        [(xb, yb.float().unsqueeze(1).expand(-1, 3)) for xb, yb in _batches(3)], loss=nn.functional.mse_loss
    )
    recipe = tilefx.Recipe(prior=_prior(layers=("fc1", "fc2.weight"), sparsity=0.5, kind="student_t"))
    gm = tilefx.optimize(model, (x,), recipe, calibration=data)
    records = _records(gm)
    assert set(records) == {"fc1.weight", "fc2.weight"}
    assert [int((~r.mask).sum()) for r in records.values()] == [96, 24]


def test_prior_options_are_checked() -> None:
    cases = [
        (lambda: _prior(sparsity=1.0), "DirichletScaleMixture.sparsity"),
        (lambda: _prior(kind="laplace"), "DirichletScaleMixture.kind"),
        (lambda: _prior(alpha=0), "DirichletScaleMixture.alpha"),
        (lambda: _prior(steps=-1), "DirichletScaleMixture.steps"),
        (lambda: _prior(steps="10"), "DirichletScaleMixture.steps"),
        (lambda: _prior(form="mean_field"), "DirichletScaleMixture.form"),
        (lambda: _prior(layers="fc1"), "DirichletScaleMixture.layers"),
        (lambda: _prior(sparsty=0.5), "did you mean 'sparsity'"),
        (lambda: tilefx.Recipe(prior=_prior(), recovery=tilefx.Recovery()), "Recipe.prior"),
        (lambda: tilefx.Recipe(prior="horseshoe"), "Recipe.prior"),  # type: ignore[arg-type]
    ]
    for make, message in cases:
        with pytest.raises(tilefx.RecipeError, match=message):
            make()


def test_bad_layers_and_missing_or_unlabeled_data_are_recipe_errors() -> None:
    model, x = MLP(), torch.randn(8, 12)
    with pytest.raises(tilefx.RecipeError, match="layers: 'fc3'"):
        tilefx.optimize(model, (x,), tilefx.Recipe(prior=_prior(layers=("fc3",))), calibration=_batches())
    with pytest.raises(tilefx.RecipeError, match="calibration"):
        tilefx.optimize(model, (x,), tilefx.Recipe(prior=_prior()))
    unlabeled = [(xb, None) for xb, _ in _batches(2)]
    with pytest.raises(tilefx.RecipeError, match="labelled"):
        tilefx.optimize(model, (x,), tilefx.Recipe(prior=_prior()), calibration=unlabeled)
    with pytest.raises(tilefx.RecipeError, match="p0"):  # τ₀ needs p0 below the 12 inputs
        tilefx.optimize(model, (x,), tilefx.Recipe(prior=_prior(p0=12.0)), calibration=_batches())


def test_prior_loads_from_toml() -> None:
    text = '[prior]\nkind = "student_t"\nsparsity = 0.7\nsteps = 5\nlayers = ["fc1"]\n'
    recipe = tilefx.Recipe.from_dict(tomllib.loads(text))
    assert recipe.prior == tilefx.DirichletScaleMixture(
        kind="student_t", sparsity=0.7, steps=5, layers=("fc1",)
    )
    with pytest.raises(tilefx.RecipeError, match="Recipe.prior: unknown option 'kinds'; did you mean 'kind'"):
        tilefx.Recipe.from_dict({"prior": {"kinds": "horseshoe"}})


def test_channel_pruning_runs_before_the_prior() -> None:
    model, x = MLP(), torch.randn(8, 12)
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.25), prior=_prior(sparsity=0.5))
    gm = tilefx.optimize(model, (x,), recipe, calibration=_batches(2))
    record = _records(gm)["fc1.weight"]
    assert tuple(gm.get_parameter("fc1.weight").shape) == (12, 12)  # 16 hidden units, a quarter removed
    assert int((~record.mask).sum()) == 72


def test_pruning_again_without_training_reports_no_change() -> None:
    x = torch.randn(8, 12)
    gm = tilefx.capture(MLP(), (x,))
    prune_only = TrainDSMPriorPass(
        tilefx.DirichletScaleMixture(steps=0, progress=False, sparsity=0.5), Calibration(_batches(2))
    )
    assert prune_only(gm, example_inputs=(x,)).modified
    assert not prune_only(gm, example_inputs=(x,)).modified
    assert int((gm.get_parameter("fc1.weight") == 0).sum()) == 96
