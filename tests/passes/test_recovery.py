"""Recovery: the training loop, the gradual schedule, distillation, checkpoints, and the pass end to end."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import tilefx
from tilefx.errors import RecipeError
from tilefx.passes import recover_sparsity
from tilefx.passes.metadata import BlockSparsity, get_metadata
from tilefx.passes.training import loop as loop_module
from tilefx.passes.training.calibration import Calibration
from tilefx.passes.training.distill import DistillLoss
from tilefx.passes.training.gradual_pruning import GradualBlockPruning, MaskedWeight
from tilefx.passes.training.loop import LoopHook, LoopOptions, train
from tilefx.passes.training.sparsity_schedule import SparsitySchedule


class MLP(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _batches(labelled: bool, count: int = 6) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        x = torch.randn(8, 16, generator=generator)
        out.append((x, (x[:, :4].argmax(1) if labelled else None)))
    return out


def _recipe(**recovery: object) -> tilefx.Recipe:
    options = {"steps": 12, "lr": 3e-3, "every": 2, "progress": False, **recovery}
    return tilefx.Recipe(
        blocks=tilefx.BlockPruning(block=(8, 1), sparsity=0.5, reorder="none"),
        recovery=tilefx.Recovery(**options),  # type: ignore[arg-type]
    )


def _pruned(gm: torch.fx.GraphModule) -> dict[str, BlockSparsity]:
    return {
        name: records[-1]
        for name, records in get_metadata(gm).params.items()
        if records and isinstance(records[-1], BlockSparsity)
    }


# ---- schedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("target", "end", "every"), [(0.8, 60, 10), (0.5, 7, 3), (0.9, 1, 1)])
def test_schedule_reaches_the_target_exactly_at_its_end(target: float, end: int, every: int) -> None:
    schedule = SparsitySchedule(target, end=end, every=every)
    values = [schedule.at(step) for step in range(end + 5)]
    assert values[0] == 0.0
    assert values[end] == target and all(v == target for v in values[end:])
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))  # monotone
    assert all(v < target for v in values[:end])
    assert schedule.prunes_at(end) and schedule.prunes_at(0)


def test_schedule_is_zhu_and_gupta_cubic() -> None:
    schedule = SparsitySchedule(0.8, end=100)
    assert schedule.at(50) == pytest.approx(0.8 * (1 - 0.5**3))
    assert SparsitySchedule(0.8, end=100, kind="oneshot").at(0) == 0.8


def test_recovered_masks_prune_exactly_the_target_number_of_blocks() -> None:
    gm = tilefx.optimize(MLP(), (torch.randn(8, 16),), _recipe(), calibration=_batches(False))
    pruned = _pruned(gm)
    assert set(pruned) == {"fc1.weight", "fc2.weight"}  # the 4-row head is not tiled by 8-row blocks
    for record in pruned.values():
        blocks = record.mask.numel()
        assert int((~record.mask).sum()) == math.floor(0.5 * blocks)


# ---- the loop and its hooks -------------------------------------------------------------------
class _CheckMasks(LoopHook):
    """After every optimiser step, the dropped blocks of every weight are exact zeros."""

    def __init__(self, pruning: GradualBlockPruning) -> None:
        self.pruning, self.checked, self.sparsities = pruning, 0, []

    def after_step(self, step: int) -> None:
        for w in self.pruning.weights:
            dropped = ~self.pruning.record(w).element_mask(w.weight.shape)
            assert torch.count_nonzero(w.weight.detach()[dropped]) == 0
        self.checked += 1
        self.sparsities.append(self.pruning.sparsity())


def _mse(model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor | None) -> torch.Tensor:
    out = model(*inputs)
    return (out - inputs[0][:, :4]).pow(2).mean()


@pytest.mark.parametrize("score", ["magnitude", "movement"])
def test_masks_stay_applied_after_every_optimizer_step(score: str) -> None:
    model = MLP()
    weights = [MaskedWeight(n, model.get_parameter(n), (8, 1), 0.75) for n in ("fc1.weight", "fc2.weight")]
    pruning = GradualBlockPruning(weights, SparsitySchedule(0.75, end=8, every=2), score)  # type: ignore[arg-type]
    check = _CheckMasks(pruning)
    options = LoopOptions(steps=12, lr=1e-2, accumulate=2, progress=False)
    result = train(model, _mse, Calibration(_batches(False)), options, [pruning, check])
    assert check.checked == 12 and len(result.losses) == 12
    assert check.sparsities[-1] == pytest.approx(0.75)
    assert check.sparsities == sorted(check.sparsities)


def test_distillation_loss_is_zero_when_student_is_teacher() -> None:
    out = [torch.randn(4, 6, 10), torch.tensor(3)]
    taps = [torch.randn(4, 6, 32), torch.randn(4, 6, 64) * 100]
    for output in ("cosine", "mse", "kl"):
        loss = DistillLoss(output)(out, out, taps, taps)  # type: ignore[arg-type]
        assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert float(DistillLoss()(out, [out[0] + 1, out[1]], taps, taps)) > 0


def test_distilling_from_an_unpruned_copy_starts_at_zero_loss() -> None:
    recipe = tilefx.Recipe(recovery=tilefx.Recovery(steps=1, lr=1e-9, progress=False, warmup=0.0))
    result = []
    original = loop_module._Run._step

    def step(self: loop_module._Run, *args: object) -> float:
        result.append(original(self, *args))  # type: ignore[arg-type]
        return result[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_module._Run, "_step", step)
        tilefx.optimize(MLP(), (torch.randn(8, 16),), recipe, calibration=_batches(False))
    assert result == [pytest.approx(0.0, abs=1e-6)]


# ---- checkpoints -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "start", [{}, {"schedule": "oneshot", "reconstruct": 3}], ids=["gradual", "reconstructed"]
)
def test_resume_from_a_checkpoint_gives_the_same_final_weights(
    tmp_path: Path, start: dict[str, object]
) -> None:
    model, x, data = MLP(), torch.randn(8, 16), _batches(False)
    whole = tilefx.optimize(
        model, (x,), _recipe(checkpoint_dir=str(tmp_path / "a"), **start), calibration=data
    )

    class Killed(Exception):
        pass

    original = loop_module._Run._step

    def dies_at_step_7(self: loop_module._Run, step: int, *args: object) -> float:
        if step == 7:
            raise Killed
        return original(self, step, *args)  # type: ignore[arg-type]

    resumed_recipe = _recipe(checkpoint_dir=str(tmp_path / "b"), checkpoint_every=3, **start)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_module._Run, "_step", dies_at_step_7)
        with pytest.raises(tilefx.PassError):
            tilefx.optimize(model, (x,), resumed_recipe, calibration=data)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 6
    with pytest.MonkeyPatch.context() as patch:  # the checkpoint holds the weights: no second refit
        patch.setattr(recover_sparsity, "reconstruct", lambda *a, **k: pytest.fail("reconstructed again"))
        resumed = tilefx.optimize(model, (x,), resumed_recipe, calibration=data)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert all(torch.equal(_pruned(whole)[n].mask, r.mask) for n, r in _pruned(resumed).items())


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    data = _batches(False)
    tilefx.optimize(MLP(), (torch.randn(8, 16),), _recipe(checkpoint_dir=str(tmp_path)), calibration=data)
    with pytest.raises(tilefx.PassError, match="different model"):
        tilefx.optimize(
            MLP(classes=3), (torch.randn(8, 16),), _recipe(checkpoint_dir=str(tmp_path)), calibration=data
        )


# ---- the recipe --------------------------------------------------------------------------------
def test_recovery_options_are_validated() -> None:
    with pytest.raises(RecipeError, match="Recovery.steps"):
        tilefx.Recovery(steps=-1)
    with pytest.raises(RecipeError, match="Recovery.schedule"):
        tilefx.Recovery(schedule="cubic")  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="did you mean 'steps'"):
        tilefx.Recovery(step=3)  # type: ignore[call-arg]
    with pytest.raises(RecipeError, match="one sparsity at a time"):
        tilefx.Recipe(
            connections=tilefx.ConnectionPruning(criterion="l1"),
            blocks=tilefx.BlockPruning(),
            recovery=tilefx.Recovery(),
        )
    recipe = tilefx.Recipe.from_dict(
        {"blocks": {"block": [16, 1], "sparsity": 0.8}, "recovery": {"steps": 30, "distill": "output"}}
    )
    assert recipe.recovery == tilefx.Recovery(steps=30, distill="output")


def test_recovery_without_calibration_names_the_fix() -> None:
    with pytest.raises(RecipeError, match="calibration"):
        tilefx.optimize(MLP(), (torch.randn(8, 16),), _recipe())


def test_unlabeled_batches_without_distillation_are_refused() -> None:
    with pytest.raises(tilefx.PassError, match="distill"):
        tilefx.optimize(MLP(), (torch.randn(8, 16),), _recipe(distill=None), calibration=_batches(False))


def test_batches_of_another_shape_are_refused() -> None:
    with pytest.raises(tilefx.PassError, match="static"):
        tilefx.optimize(MLP(), (torch.randn(4, 16),), _recipe(), calibration=_batches(False))


# ---- end to end --------------------------------------------------------------------------------
@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "unlabeled"])
def test_recovery_end_to_end_through_optimize_and_compile(labelled: bool) -> None:
    model, x, data = MLP(), torch.randn(8, 16), _batches(labelled)
    recipe = _recipe(steps=30, distill=None if labelled else "hidden")
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(8, 1), sparsity=0.5), recovery=recipe.recovery)
    gm = tilefx.optimize(model, (x,), recipe, calibration=data)
    assert set(_pruned(gm)) == {"fc1.weight", "fc2.weight"}
    for name, record in _pruned(gm).items():
        weight = gm.get_parameter(name).detach()
        assert torch.count_nonzero(weight[~record.element_mask(weight.shape)]) == 0
    compiled = tilefx.compile(gm, target="llvm", fallback="never")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), gm(x), rtol=1e-4, atol=1e-4)
    for parameter in model.parameters():  # the caller's model is untouched
        assert parameter.requires_grad


def test_connections_are_pruned_gradually_as_one_by_kernel_blocks() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)
    ).eval()
    x = torch.randn(2, 3, 6, 6)
    data = [(torch.randn(2, 3, 6, 6), None) for _ in range(3)]
    recipe = tilefx.Recipe(
        connections=tilefx.ConnectionPruning(sparsity=0.5, criterion="l1"),
        recovery=tilefx.Recovery(steps=6, lr=1e-3, every=2, progress=False),
    )
    gm = tilefx.optimize(model, (x,), recipe, calibration=data)
    pruned = _pruned(gm)
    assert len(pruned) == 2
    for record in pruned.values():
        assert record.block == (1, 9)
        assert int((~record.mask).sum()) == record.mask.numel() // 2


def test_trainable_layers_leaves_norms_as_the_dense_model_has_them() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    recipe = _recipe(trainable="layers")
    gm = tilefx.optimize(model, (torch.randn(8, 16),), recipe, calibration=_batches(False))
    assert torch.equal(gm.get_parameter("1.weight"), model[1].weight)
    assert not torch.equal(gm.get_parameter("0.bias"), model[0].bias)


def test_recovery_defaults_are_the_documented_recipe() -> None:
    """docs/recovery.md spells every default it justifies; changing one must change the docs."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "recovery.md").read_text()
    found = re.search(r"<!-- the defaults -->\s*```python\n(.*?)```", text, re.S)
    assert found is not None, "docs/recovery.md lost its block of defaults"
    documented = eval(found.group(1), {"tilefx": tilefx})  # a literal Recovery(...) call
    assert documented == tilefx.Recovery()
    for name in ("schedule", "reconstruct", "steps", "lr", "trainable", "check_batches", "token_mask"):
        assert f"{name}=" in found.group(1), f"the documented recipe leaves {name} unsaid"


def test_default_check_holds_out_batches_only_when_enough_are_given(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(4, 8)
    trained_on: list[int] = []
    original = recover_sparsity.train

    def counting(module, objective, data, options, hooks):  # type: ignore[no-untyped-def]
        trained_on.append(len(list(data)))
        return original(module, objective, data, options, hooks)

    monkeypatch.setattr(recover_sparsity, "train", counting)
    recipe = tilefx.Recipe(
        blocks=tilefx.BlockPruning(block=(4, 1), sparsity=0.5, reorder="none"),
        recovery=tilefx.Recovery(steps=2, progress=False),  # the default check_batches
    )
    for batches in (8, 16):
        tilefx.optimize(model, (x,), recipe, calibration=[(torch.randn(4, 8), None) for _ in range(batches)])
    assert trained_on == [8, 12]  # 8 are too few to spare 4; of 16, 4 are held out for the check
