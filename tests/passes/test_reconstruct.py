"""Layer-wise reconstruction: the refit is the least-squares optimum, it beats magnitude pruning,
it prunes exactly the target, ignores padding, and is refused where it contradicts the schedule."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import tilefx
from tilefx.errors import RecipeError
from tilefx.graph_capture import capture
from tilefx.passes.analysis.weight_layers import weight_layers
from tilefx.passes.metadata import BlockSparsity, get_metadata, matrix_view
from tilefx.passes.training.calibration import Calibration
from tilefx.passes.training.gradual_pruning import MaskedWeight
from tilefx.passes.training.reconstruct import reconstruct
from tilefx.passes.training.taps import Tapped


class Net(nn.Module):
    """A conv (stride 2, padding 1) then a linear: both kinds the reconstruction unfolds or reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class Tokens(nn.Module):
    """A per-token MLP whose output is zeroed at padding (``mask`` = a tokenizer's attention mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) * mask.unsqueeze(-1)


def _images(count: int = 8) -> list[tuple[tuple[torch.Tensor], None]]:
    generator = torch.Generator().manual_seed(3)
    mix = torch.randn(4, 4, generator=generator)  # correlated channels, as real activations are
    return [
        ((torch.einsum("oc,nchw->nohw", mix, torch.randn(32, 4, 8, 8, generator=generator)),), None)
        for _ in range(count)
    ]


def _masked(gm: torch.fx.GraphModule, block: tuple[int, int], sparsity: float) -> list[MaskedWeight]:
    return [
        MaskedWeight(layer.param, gm.get_parameter(layer.param), layer.stored_block(block), sparsity)
        for layer in weight_layers(gm)
    ]


@pytest.mark.parametrize("param", ["conv.weight", "fc.weight"])
def test_the_refit_is_the_least_squares_optimum_of_each_layer(param: str) -> None:
    data = _images()
    gm = capture(Net().eval(), data[0][0])
    teacher = copy.deepcopy(gm)
    weights = [w for w in _masked(gm, (4, 1), 0.5) if w.name == param]
    keep = reconstruct(gm, teacher, weights, Calibration(data), batches=len(data), damp=0.0, progress=False)
    record = BlockSparsity(weights[0].block, keep[param])
    assert torch.equal(
        gm.get_parameter(param) * record.element_mask(weights[0].weight.shape), gm.get_parameter(param)
    )

    # Optimal: the gradient of the layer's squared error to the dense layer's output vanishes on
    # every kept weight and bias (computed by autograd through the module, not the solver's algebra).
    node = next(lay.node for lay in weight_layers(gm) if lay.param == param)
    student_input = _node_values(gm, node.args[0].name, data)
    teacher_output = _node_values(teacher, node.name, data)
    kept = record.element_mask(weights[0].weight.shape).bool()

    def gradients(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = (
            weight.detach().double().requires_grad_(True),
            bias.detach().double().requires_grad_(True),
        )
        op = torch.nn.functional.conv2d if weight.dim() == 4 else torch.nn.functional.linear
        kwargs = {"stride": 2, "padding": 1} if weight.dim() == 4 else {}
        pairs = zip(student_input, teacher_output, strict=True)
        sum(((op(x.double(), weight, bias, **kwargs) - y.double()) ** 2).sum() for x, y in pairs).backward()  # type: ignore[union-attr]
        return weight.grad[kept].abs().max(), bias.grad.abs().max()  # type: ignore[index, union-attr]

    bias = param.replace("weight", "bias")
    refit = gradients(gm.get_parameter(param), gm.get_parameter(bias))
    masked = gradients(teacher.get_parameter(param) * kept, teacher.get_parameter(bias))  # pruned, not refit
    assert refit[0] < 1e-6 * masked[0] and refit[1] < 1e-6 * masked[1], (refit, masked)


def _node_values(
    gm: torch.fx.GraphModule, name: str, data: list[tuple[tuple[torch.Tensor], None]]
) -> list[torch.Tensor]:
    tapped = Tapped(gm, [name], outputs=False)
    with torch.no_grad():
        return [tapped(inputs)[1][0] for inputs, _ in data]


def _output_error(block: tuple[int, int], reconstruct_batches: int) -> float:
    model, data = Net().eval(), _images()
    recipe = tilefx.Recipe(
        blocks=tilefx.BlockPruning(block=block, sparsity=0.75, reorder="none"),
        recovery=tilefx.Recovery(
            steps=0, schedule="oneshot", reconstruct=reconstruct_batches, progress=False
        ),
    )
    pruned = tilefx.optimize(model, data[0][0], recipe, calibration=data)
    with torch.no_grad():
        dense = torch.cat([model(*x) for x, _ in data])
        ours = torch.cat([pruned(*x) for x, _ in data])
    return float((ours - dense).norm() / dense.norm())


@pytest.mark.parametrize("block", [(4, 1), (1, 1)])
def test_reconstruction_beats_magnitude_pruning_on_the_calibration_data(block: tuple[int, int]) -> None:
    magnitude, reconstructed = _output_error(block, 0), _output_error(block, 8)
    assert reconstructed < 0.7 * magnitude, (reconstructed, magnitude)


def test_reconstructed_masks_drop_exactly_the_target_blocks() -> None:
    data = _images()
    recipe = tilefx.Recipe(
        blocks=tilefx.BlockPruning(block=(4, 1), sparsity=0.7, reorder="none"),
        recovery=tilefx.Recovery(steps=2, lr=1e-3, schedule="oneshot", reconstruct=2, progress=False),
    )
    gm = tilefx.optimize(Net().eval(), data[0][0], recipe, calibration=data)
    records = {n: r[-1] for n, r in get_metadata(gm).params.items() if r and isinstance(r[-1], BlockSparsity)}
    assert set(records) == {"conv.weight", "fc.weight"}
    for name, record in records.items():
        assert int((~record.mask).sum()) == int(0.7 * record.mask.numel())
        weight = matrix_view(gm.get_parameter(name).detach())
        assert torch.equal(weight * record.element_mask(weight.shape).to(weight), weight)


def test_padding_positions_do_not_change_the_reconstruction() -> None:
    generator = torch.Generator().manual_seed(5)
    mask = (torch.arange(12) < torch.randint(4, 12, (16, 1), generator=generator)).long()
    clean = [
        ((torch.randn(16, 12, 8, generator=generator) * mask.unsqueeze(-1), mask), None) for _ in range(3)
    ]
    noisy = [
        ((x + 100.0 * (1 - m.unsqueeze(-1)) * torch.randn(x.shape, generator=generator), m), None)
        for (x, m), _ in clean
    ]
    results = []
    for data in (clean, noisy):
        gm = capture(Tokens().eval(), data[0][0])
        torch.manual_seed(0)
        reconstruct(
            gm,
            copy.deepcopy(gm),
            _masked(gm, (8, 1), 0.5),
            Calibration(data),
            3,
            token_mask=1,
            progress=False,
        )
        results.append(gm.state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_reconstruct_needs_a_oneshot_schedule() -> None:
    with pytest.raises(RecipeError, match="oneshot"):
        tilefx.Recovery(reconstruct=4, schedule="gradual")
    with pytest.raises(RecipeError, match="reconstruct"):
        tilefx.Recovery(reconstruct=-1, schedule="oneshot")
    assert tilefx.Recovery().reconstruct == 32  # the default refits when pruning at once ...
    assert tilefx.Recovery(schedule="gradual").reconstruct == 0  # ... and never while ramping
