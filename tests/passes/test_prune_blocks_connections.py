"""PruneBlocksPass and PruneConnectionsPass: masked numerics, exact counts, idempotence, typed errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
from torch import nn

from tilefx.errors import RecipeError, WeightError
from tilefx.passes.analysis.connection_strength import StrengthOptions, SynapticStrength
from tilefx.passes.analysis.weight_layers import LayerSelection, weight_layers
from tilefx.passes.infra.analysis_manager import AnalysisManager
from tilefx.passes.metadata import BlockSparsity, get_metadata
from tilefx.passes.prune_blocks import PruneBlocksPass
from tilefx.passes.prune_connections import PruneConnectionsPass


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = torch.relu(self.conv3(x))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def _capture(model: nn.Module | None = None) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = (model or Net()).eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        nn.init.uniform_(bn.weight, 0.1, 2.0)
        nn.init.normal_(bn.running_mean)
        nn.init.uniform_(bn.running_var, 0.5, 2.0)
    x = (torch.randn(2, 3, 8, 8),)
    return torch.export.export(model, x, strict=False).module(), x


def _run(
    pass_: PruneBlocksPass | PruneConnectionsPass, gm: torch.fx.GraphModule, x: tuple[torch.Tensor]
) -> bool:
    return pass_.run(gm, AnalysisManager(gm, x)).modified


def _check_masked(pass_: PruneBlocksPass | PruneConnectionsPass) -> torch.fx.GraphModule:
    gm, x = _capture()
    before = copy.deepcopy(gm)
    assert _run(pass_, gm, x)
    reference = pass_.masked_reference(copy.deepcopy(before), gm, x)
    torch.testing.assert_close(gm(*x), reference(*x), rtol=0, atol=0)
    assert not torch.equal(gm(*x), before(*x))
    assert not _run(pass_, gm, x), "a second run must report modified=False"
    return gm


def test_prune_blocks_matches_hand_masked_model_and_is_idempotent() -> None:
    gm = _check_masked(PruneBlocksPass(block=(8, 4), sparsity=0.5))
    meta = get_metadata(gm)
    conv2 = meta.of("conv2.weight", BlockSparsity)[0]
    assert conv2.block == (8, 4 * 9)  # a conv block spans the kernel on the matrix view
    assert tuple(conv2.mask.shape) == (4, 4) and int((~conv2.mask).sum()) == 8
    weight = gm.get_parameter("conv2.weight")
    assert torch.equal(weight == 0, ~conv2.element_mask(weight.shape)) or bool(
        (weight[~conv2.element_mask(weight.shape)] == 0).all()
    )
    fc1 = meta.of("fc1.weight", BlockSparsity)[0]
    assert fc1.block == (8, 4) and int((~fc1.mask).sum()) == (64 // 8) * (512 // 4) // 2


def test_prune_blocks_chooses_the_lowest_l1_blocks() -> None:
    gm, x = _capture()
    with torch.no_grad():
        gm.get_parameter("fc2.weight")[:2, :4] *= 1e-3  # make block (0, 0) of (2, 4) the smallest
    _run(PruneBlocksPass(block=(2, 4), sparsity=0.02), gm, x)
    mask = get_metadata(gm).of("fc2.weight", BlockSparsity)[0].mask
    assert not bool(mask[0, 0]) and int((~mask).sum()) == 1


def test_prune_blocks_skips_or_rejects_indivisible_layers() -> None:
    gm, x = _capture()
    plans = {p.param: p for p in PruneBlocksPass(block=(16, 16), sparsity=0.5).plan(gm)}
    assert (
        plans["conv1.weight"].sparsity is None and "does not divide" in plans["conv1.weight"].reason
    )  # in=3
    assert plans["fc2.weight"].sparsity is None  # out=10
    assert plans["fc1.weight"].sparsity == 0.5
    with pytest.raises(RecipeError, match="does not divide"):
        PruneBlocksPass(block=(16, 16), sparsity=0.5, indivisible="raise").plan(gm)


def test_layer_selection_options() -> None:
    gm, _ = _capture()
    selection = LayerSelection(skip_first=True, skip_last=True, min_size=1000, per_layer={"fc1.weight": 0.9})
    plans = {p.param: p for p in PruneBlocksPass(block=(1, 1), sparsity=0.5, selection=selection).plan(gm)}
    assert plans["conv1.weight"].sparsity is None and "first" in plans["conv1.weight"].reason
    assert plans["fc2.weight"].sparsity is None and "last" in plans["fc2.weight"].reason
    assert plans["fc1.weight"].sparsity == 0.9 and plans["conv2.weight"].sparsity == 0.5
    with pytest.raises(RecipeError, match="per_layer"):
        PruneBlocksPass(block=(1, 1), sparsity=0.5, selection=LayerSelection(per_layer={"nope": 0.1})).plan(
            gm
        )


@pytest.mark.parametrize("sparsity", [1.0, -0.5])
def test_sparsity_out_of_range(sparsity: float) -> None:
    with pytest.raises(RecipeError):
        PruneBlocksPass(block=(4, 4), sparsity=sparsity)
    with pytest.raises(RecipeError):
        PruneConnectionsPass(sparsity=sparsity)


def test_nan_weights_raise() -> None:
    gm, x = _capture()
    with torch.no_grad():
        gm.get_parameter("conv2.weight")[0, 0, 0, 0] = float("nan")
    with pytest.raises(WeightError, match="conv2.weight"):
        _run(PruneBlocksPass(block=(8, 4), sparsity=0.5), gm, x)
    with pytest.raises(WeightError, match="conv2.weight"):
        _run(PruneConnectionsPass(sparsity=0.5), gm, x)


@pytest.mark.parametrize("criterion", ["synaptic_strength", "l1"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_connections_exact_sparsity_masked_and_idempotent(criterion: str, scope: str) -> None:
    gm = _check_masked(PruneConnectionsPass(sparsity=0.7, criterion=criterion, scope=scope))  # type: ignore[arg-type]
    records = {
        name: get_metadata(gm).of(name, BlockSparsity)[0]
        for name in ("conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight", "fc2.weight")
    }
    assert records["conv2.weight"].block == (1, 9) and tuple(records["conv2.weight"].mask.shape) == (32, 16)
    assert records["conv3.weight"].block == (1, 9) and tuple(records["conv3.weight"].mask.shape) == (32, 8)
    assert records["fc1.weight"].block == (1, 1)
    pruned = [int((~r.mask).sum()) for r in records.values()]
    sizes = [r.mask.numel() for r in records.values()]
    if scope == "global":
        assert sum(pruned) == int(0.7 * sum(sizes))
    else:
        assert pruned == [int(0.7 * n) for n in sizes]


def test_synaptic_strength_uses_the_input_bn_scale() -> None:
    gm, x = _capture()
    with torch.no_grad():
        gm.get_parameter("bn1.weight")[5] = 1e-4  # input channel 5 of conv2 carries almost nothing
    layers = {layer.param: layer for layer in weight_layers(gm)}
    strengths = AnalysisManager(gm, x).get(SynapticStrength())
    conv2 = gm.get_parameter("conv2.weight").detach().double()
    gamma = gm.get_parameter("bn1.weight").detach().double().abs()
    expected = conv2.flatten(2).norm(dim=2) * gamma[None, :]
    torch.testing.assert_close(strengths["conv2.weight"], expected)
    assert torch.equal(
        strengths["conv1.weight"], gm.get_parameter("conv1.weight").detach().double().flatten(2).norm(dim=2)
    )
    # fc1 reads flatten(relu(conv3)): no BN directly behind it, so γ = 1
    assert torch.equal(strengths["fc1.weight"], gm.get_parameter("fc1.weight").detach().double().abs())
    assert layers["conv3.weight"].groups == 4
    # conv3 (groups=4) reads maxpool(relu(bn2)): group g's local channel i is bn2 channel 8g + i
    conv3 = gm.get_parameter("conv3.weight").detach().double().flatten(2).norm(dim=2)
    gamma2 = gm.get_parameter("bn2.weight").detach().double().abs()
    torch.testing.assert_close(
        strengths["conv3.weight"], conv3 * gamma2.reshape(4, 8).repeat_interleave(8, 0)
    )
    gm2, _ = _capture()
    with torch.no_grad():
        gm2.get_parameter("bn1.weight")[5] = 1e-4
    _run(PruneConnectionsPass(sparsity=1 / 16, scope="layer"), gm2, x)
    mask = get_metadata(gm2).of("conv2.weight", BlockSparsity)[0].mask
    assert not bool(mask[:, 5].any()) and int((~mask).sum()) == 32  # the 32 connections from channel 5
    none = AnalysisManager(gm, x).get(SynapticStrength(StrengthOptions(input_scale="none")))
    torch.testing.assert_close(none["conv2.weight"], conv2.flatten(2).norm(dim=2))


def test_connections_then_blocks_through_the_verifying_pass_manager() -> None:
    from tilefx.passes.infra.manager import PassManager

    gm, x = _capture()
    passes = [PruneConnectionsPass(sparsity=0.5), PruneBlocksPass(block=(8, 4), sparsity=0.5)]
    result = PassManager(passes).run(gm, x)  # verifies masked numerics and honest `modified`
    assert [m for _, m in result.ran] == [True, True]
    again = PassManager([PruneBlocksPass(block=(8, 4), sparsity=0.5)]).run(result.graph_module, x)
    assert again.ran == (("PruneBlocksPass", False),)
