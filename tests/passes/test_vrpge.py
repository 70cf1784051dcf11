"""VR-PGE: the estimator is unbiased, the projection meets the budget, the wrappers fold away exactly,
the search keeps informative channels, and the recipe runs end to end through tilefx.optimize."""

from __future__ import annotations

import itertools
import tomllib

import pytest
import torch
import torch.nn as nn

import tilefx
from tests.models import Informative, informative_data
from tilefx.errors import PreconditionError, RecipeError
from tilefx.graph_capture import capture
from tilefx.passes.analysis.channel_groups import ChannelGroupsAnalysis
from tilefx.passes.analysis.importance import ChannelImportance, score_groups
from tilefx.passes.analysis.shapes import Shapes
from tilefx.passes.criteria.vrpge import (
    StructureSearch,
    VRPGEOptions,
    final_mask,
    project_scores,
    search_structure,
    unit_costs,
    vrpge_gradient,
)
from tilefx.passes.infra.analysis_manager import AnalysisManager
from tilefx.passes.infra.manager import PassManager
from tilefx.passes.materialize_masks import MaterializeChannelMasksPass
from tilefx.passes.prune_channels import PruneChannelsPass
from tilefx.passes.train_structure_params import TrainStructureParamsPass
from tilefx.passes.training.calibration import Calibration
from tilefx.passes.training.structure_masks import (
    MASKS_MODULE,
    ChannelMask,
    channel_masks,
    wrap_channel_masks,
)

# ---- the estimator ---------------------------------------------------------------------------


def _expected_loss_gradient(scores: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """∇_s E_{m~Bern(s)}[L(m)] by enumerating all 2^n masks (``table[k]`` = L of mask k's bits)."""
    s = scores.clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    for k, bits in enumerate(itertools.product((0.0, 1.0), repeat=s.numel())):
        m = torch.tensor(bits, dtype=torch.float64)
        total = total + table[k] * torch.prod(s**m * (1 - s) ** (1 - m))
    (grad,) = torch.autograd.grad(total, s)
    return grad


@pytest.mark.parametrize("estimator", ["score", "code"])
@pytest.mark.parametrize("samples", [2, 3])
def test_estimator_is_unbiased_on_an_enumerable_problem(estimator: str, samples: int) -> None:
    generator = torch.Generator().manual_seed(0)
    n = 3
    scores = torch.tensor([0.2, 0.5, 0.85], dtype=torch.float64)
    table = torch.randn(2**n, generator=generator, dtype=torch.float64) + 2.0
    exact = _expected_loss_gradient(scores, table)
    if estimator == "code":  # the code's ψ is the score function times sqrt(s(1 − s))
        exact = exact * (scores * (1 - scores)).sqrt()
    draws = 200_000
    masks = torch.bernoulli(scores.expand(draws, samples, n), generator=generator)
    index = (masks * torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)).sum(-1).long()
    estimates = vrpge_gradient(table[index], masks, scores, estimator)  # type: ignore[arg-type]
    mean, error = estimates.mean(0), estimates.std(0) / draws**0.5
    assert torch.all((mean - exact).abs() <= 4 * error), (mean, exact, error)
    assert float(error.max()) < 0.02  # the check is sharp enough to catch a wrong ψ or baseline


def test_baseline_removes_a_constant_loss() -> None:
    masks = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    same = vrpge_gradient(torch.tensor([3.0, 3.0], dtype=torch.float64), masks, torch.tensor([0.5, 0.5]))
    assert torch.equal(same, torch.zeros(2, dtype=torch.float64))


# ---- the projection ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_projection_meets_the_budget_exactly_and_is_the_nearest_feasible_point(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(50, generator=generator, dtype=torch.float64) * 1.6 - 0.3
    costs = torch.rand(50, generator=generator, dtype=torch.float64) * 5 + 0.1
    budget = 0.3 * float(costs.sum())
    projected = project_scores(scores, costs, budget)
    assert abs(float(costs @ projected) - budget) <= 1e-9 * budget
    assert bool(((projected >= 0) & (projected <= 1)).all())
    assert torch.allclose(project_scores(projected, costs, budget), projected, atol=1e-12)  # idempotent
    for _ in range(200):  # no feasible point is nearer
        other = project_scores(torch.rand(50, generator=generator, dtype=torch.float64), costs, budget)
        assert (scores - projected).norm() <= (scores - other).norm() + 1e-12


def test_projection_leaves_a_feasible_point_alone_and_rejects_bad_costs() -> None:
    scores = torch.tensor([0.1, 0.2, 1.4, -0.5], dtype=torch.float64)
    assert torch.equal(project_scores(scores, torch.ones(4, dtype=torch.float64), 3.0), scores.clamp(0, 1))
    with pytest.raises(RecipeError, match="costs must be positive"):
        project_scores(scores, torch.zeros(4, dtype=torch.float64), 1.0)


# ---- wrappers and the materialise pass -----------------------------------------------------------


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv1(x))
        b = torch.relu(self.conv2(a))
        c = self.conv3(b) + a  # a residual: conv1 and conv3 share one group
        return self.fc(torch.relu(c).mean((2, 3)))


def _wrapped_with_random_masks(seed: int = 0) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    x = (torch.randn(2, 1, 5, 5),)
    gm = capture(TinyCNN().eval(), x)
    groups = ChannelGroupsAnalysis().run(gm, AnalysisManager(gm, x)).prunable()
    for wrapped in wrap_channel_masks(gm, groups):
        mask = torch.bernoulli(torch.full((wrapped.group.units,), 0.5))
        mask[0] = 1.0
        wrapped.mask.set_mask(mask)
    return gm, x


def test_materialise_folds_every_wrapper_and_matches_the_masked_model() -> None:
    gm, x = _wrapped_with_random_masks()
    assert len(channel_masks(gm)) >= 2
    expected = gm(*x)
    result = MaterializeChannelMasksPass()(gm, example_inputs=x)
    assert result.modified
    assert not channel_masks(gm) and not hasattr(gm, MASKS_MODULE)
    assert not any(isinstance(m, ChannelMask) for m in gm.modules())
    assert all(n.op != "call_module" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*x), expected, rtol=0, atol=0)
    assert not MaterializeChannelMasksPass()(gm, example_inputs=x).modified


def test_pruning_after_materialise_removes_exactly_the_masked_units_and_is_verified() -> None:
    gm, x = _wrapped_with_random_masks(1)
    masks = {n.target: gm.get_submodule(str(n.target)).mask.clone() for n in channel_masks(gm)}  # type: ignore[union-attr]
    expected = gm(*x)
    groups = ChannelGroupsAnalysis()
    pipeline = [MaterializeChannelMasksPass(), PruneChannelsPass(scores=ChannelImportance(groups, "vrpge"))]
    out = PassManager(pipeline).run(gm, x).graph_module  # verified: exact, then masked
    torch.testing.assert_close(out(*x), expected)
    kept = sorted(int(m.sum()) for m in masks.values())
    widths = sorted(
        int(p.shape[0]) for n, p in out.named_parameters() if n.startswith("conv") and n.endswith("bias")
    )
    assert set(widths) == set(kept)


def test_wrapped_graph_is_refused_by_passes_that_need_aten() -> None:
    gm, x = _wrapped_with_random_masks()
    with pytest.raises(PreconditionError, match="ATen-level graph"):
        PruneChannelsPass()(gm, example_inputs=x)


def test_vrpge_criterion_on_an_untrained_graph_keeps_everything_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    x = (torch.randn(2, 1, 5, 5),)
    gm = capture(TinyCNN().eval(), x)
    groups = ChannelGroupsAnalysis().run(gm, AnalysisManager(gm, x))
    scores = score_groups(gm, groups, "vrpge")
    assert all(scores.keep[g.id] == g.units for g in groups.prunable())
    assert "no masked channel" in caplog.text


def test_ratio_zero_prunes_nothing() -> None:
    data = [(torch.randn(8, 1, 5, 5), torch.randint(0, 3, (8,)))]
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.0, criterion="vrpge"))
    out = tilefx.optimize(TinyCNN().eval(), (data[0][0][:2],), recipe=recipe, calibration=data)
    assert out.get_parameter("conv2.bias").shape == (6,)


def test_flops_costs_are_the_units_multiply_accumulates() -> None:
    x = (torch.randn(2, 1, 5, 5),)
    gm = capture(TinyCNN().eval(), x)
    am = AnalysisManager(gm, x)
    shapes = am.get(Shapes())
    groups = {g.units: g for g in ChannelGroupsAnalysis().run(gm, am).prunable()}
    costs = [unit_costs(gm, g, "flops", shapes) for g in groups.values()]
    # the residual group: conv1 + conv3 filters (9 and 54 MACs per position), conv2 + fc inputs
    assert all(bool((c > 1).all()) for c in costs)
    assert all(torch.equal(unit_costs(gm, g, "channels", shapes), torch.ones(g.units, dtype=torch.float64))
               for g in groups.values())  # fmt: skip


# ---- the search --------------------------------------------------------------------------------

SEARCH = VRPGEOptions(steps=60, lr=0.01, score_lr=0.05, finetune_steps=5, final="top")


def test_search_keeps_informative_channels_under_the_budget() -> None:
    """Informative's conv1 has 4 signal and 4 noise channels (noise with the larger filters); with
    the classifier's sign flipped the signal channels lower the loss from the start. Keeping 2 of
    8, the search must keep 2 signal channels."""
    x = (torch.randn(2, 2, 4, 4),)
    model = Informative().eval()
    with torch.no_grad():
        model.fc.weight.neg_()
    gm = capture(model, x)
    search = TrainStructureParamsPass(0.75, informative_data(4), SEARCH, protect=("fc",))
    out = PassManager([search, MaterializeChannelMasksPass()]).run(gm, x).graph_module
    weight = out.get_parameter("conv2.weight")
    alive = {c for c in range(8) if bool(weight[:, c].abs().sum() > 0)}
    assert len(alive) == 2 and alive <= {0, 1, 2, 3}


def test_optimize_prunes_a_tiny_cnn_end_to_end() -> None:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(8, 1, 5, 5), torch.randint(0, 3, (8,))) for _ in range(3)]
    options = {"steps": 10, "finetune_steps": 3}
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5, criterion="vrpge", options=options))
    out = tilefx.optimize(model, (data[0][0][:2],), recipe=recipe, calibration=data)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # never mutated
    assert all(n.op != "call_module" for n in out.graph.nodes)
    widths = [out.get_parameter(f"{name}.bias").shape[0] for name in ("conv1", "conv2", "conv3")]
    assert sum(widths) < 18
    assert out(data[0][0]).shape == (8, 3)


def test_recipe_loads_vrpge_options_from_toml_and_checks_them() -> None:
    text = 'channels = { ratio = 0.4, criterion = "vrpge", options = { steps = 5, estimator = "score" } }'
    recipe = tilefx.Recipe.from_dict(tomllib.loads(text))
    assert recipe.channels is not None and recipe.channels.options == VRPGEOptions(steps=5, estimator="score")
    with pytest.raises(RecipeError, match="did you mean 'steps'"):
        tilefx.ChannelPruning(criterion="vrpge", options={"step": 5})
    with pytest.raises(RecipeError, match="criterion='l1' takes no options"):
        tilefx.ChannelPruning(criterion="l1", options=VRPGEOptions())
    with pytest.raises(RecipeError, match="must be a VRPGEOptions"):
        tilefx.ChannelPruning(criterion="vrpge", options=tilefx.DCPOptions())
    with pytest.raises(RecipeError, match="samples"):
        VRPGEOptions(samples=1)
    with pytest.raises(RecipeError, match="calibration"):
        tilefx.optimize(TinyCNN().eval(), (torch.randn(2, 1, 5, 5),),
                        recipe=tilefx.Recipe(channels=tilefx.ChannelPruning(criterion="vrpge")))  # fmt: skip


def test_the_pruned_model_compiles_and_matches_its_torch_form() -> None:
    pytest.importorskip("tvm")
    torch.manual_seed(0)
    data = [(torch.randn(8, 1, 5, 5), torch.randint(0, 3, (8,))) for _ in range(2)]
    options = VRPGEOptions(steps=4, finetune_steps=0)
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5, criterion="vrpge", options=options))
    out = tilefx.optimize(TinyCNN().eval(), (data[0][0][:2],), recipe=recipe, calibration=data)
    with pytest.warns(tilefx.CoverageWarning):  # smaller dense layers: nothing block-sparse to lower
        compiled = tilefx.compile(out, target="llvm")
    with torch.no_grad():
        torch.testing.assert_close(compiled(data[1][0]), out(data[1][0]))


@pytest.mark.parametrize("budget", ["channels", "flops"])
def test_scores_stay_on_the_budget_and_the_top_mask_fits_it(budget: str) -> None:
    torch.manual_seed(0)
    x = (torch.randn(2, 1, 5, 5),)
    gm = capture(TinyCNN().eval(), x)
    am = AnalysisManager(gm, x)
    groups = [g for g in ChannelGroupsAnalysis().run(gm, am).prunable() if g.units > 1]
    costs = [unit_costs(gm, g, budget, am.get(Shapes())) for g in groups]  # type: ignore[arg-type]
    wrapped = wrap_channel_masks(gm, groups)
    data = Calibration([(torch.randn(8, 1, 5, 5), torch.randint(0, 3, (8,))) for _ in range(2)])
    options = VRPGEOptions(steps=5, finetune_steps=0, final="top", budget=budget)  # type: ignore[arg-type]
    search = search_structure(gm, wrapped, costs, 0.4, data, options)
    assert isinstance(search, StructureSearch)
    spent = float(search.costs @ search.scores.detach())
    assert abs(spent - search.budget) <= 1e-9 * search.budget
    mask = final_mask(search, gm, data).double()
    assert float(search.costs @ mask) <= search.budget + 1e-9
