"""Self-supervised GAN compression: the consistency loss, the schedule and masks inside the one loop,
who trains and who does not, bad options, and the compressed generator through tilefx.compile."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import tilefx
from tilefx.errors import RecipeError
from tilefx.gan_training import (
    GANCompressionOptions,
    GANPlayers,
    compress_generator,
    consistency_losses,
    gan_losses,
    player_losses,
)
from tilefx.passes.training.gradual_pruning import GradualBlockPruning

LATENT = 6


def _gan() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    generator = nn.Sequential(
        nn.Linear(LATENT, 24), nn.LeakyReLU(0.2), nn.Linear(24, 32), nn.LeakyReLU(0.2), nn.Linear(32, 16), nn.Tanh()
    )  # fmt: skip
    discriminator = nn.Sequential(nn.Linear(16, 24), nn.LeakyReLU(0.2), nn.Linear(24, 1))
    return generator, discriminator


def _real() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(8, 16, generator=generator) * 2 - 1 for _ in range(3)]


def _latent(n: int) -> torch.Tensor:
    return torch.randn(n, LATENT)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_consistency_loss_is_exactly_zero_when_the_compressed_generator_is_the_original() -> None:
    generator, discriminator = _gan()
    student = copy.deepcopy(generator)
    z, real = _latent(8), _real()[0]
    as_generator_sees, _ = player_losses(discriminator, real, student(z))
    generative, discriminative = consistency_losses(
        as_generator_sees, gan_losses(discriminator, real, generator(z))
    )
    assert float(generative.detach()) == 0.0 and float(discriminative.detach()) == 0.0
    with torch.no_grad():
        student[0].weight.mul_(0.5)
    moved, _ = player_losses(discriminator, real, student(z))
    assert float(consistency_losses(moved, gan_losses(discriminator, real, generator(z)))[0].detach()) > 0


def test_each_player_gets_only_its_own_gradient() -> None:
    generator, discriminator = _gan()
    as_generator_sees, own = player_losses(discriminator, _real()[0], generator(_latent(8)))
    (as_generator_sees.generator + as_generator_sees.discriminator).backward()
    assert all(p.grad is None for p in discriminator.parameters())
    assert all(p.grad is not None for p in generator.parameters())
    generator.zero_grad(set_to_none=True)
    own.backward()
    assert all(p.grad is None for p in generator.parameters())
    assert all(p.grad is not None for p in discriminator.parameters())


@pytest.mark.parametrize("granularity", ["element", "filter"])
def test_schedule_masks_and_who_trains(granularity: Any) -> None:
    generator, discriminator = _gan()
    before_g, before_d = _state(generator), _state(discriminator)
    steps, target = 12, 0.75
    options = GANCompressionOptions(target, granularity=granularity, steps=steps, lr=1e-2)
    seen: list[float] = []

    def on_step(step: int, players: GANPlayers, pruning: GradualBlockPruning) -> None:
        for w in pruning.weights:  # masks hold after every optimiser step
            dropped = ~pruning.record(w).element_mask(w.weight.shape)
            assert torch.count_nonzero(w.weight.detach()[dropped]) == 0, (step, w.name)
        seen.append(pruning.sparsity())

    result = compress_generator(generator, discriminator, _real(), _latent, options, on_step=on_step)
    end = options.sparsity_schedule().end
    assert end == steps // 2 and options.sparsity_schedule().at(0) == options.initial
    assert options.sparsity_schedule().at(end) == target
    assert all(s < target for s in seen[:end]) and seen[0] > 0  # the ramp starts at 5%
    assert all(math.isclose(s, target) for s in seen[end:])  # exactly the target from half-way on
    assert seen == sorted(seen)
    assert _same(_state(generator), before_g) and _same(_state(discriminator), before_d)  # untouched
    assert _same(_state(result.teacher), before_g)  # G_O frozen
    assert not _same(_state(result.discriminator), before_d)  # D trained
    assert math.isclose(result.sparsity(), target)
    if granularity == "filter":  # the output layer stays whole; dropped filters lose their bias
        assert set(result.masks) == {"0.weight", "2.weight"}
        for name, record in result.masks.items():
            bias = result.generator.get_parameter(name.replace("weight", "bias"))
            assert torch.count_nonzero(bias.detach()[~record.mask.reshape(-1)]) == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sparsity", 0.0),
        ("sparsity", 1.0),
        ("granularity", "kernel"),
        ("lambda_d", -1.0),
        ("initial", 1.0),
        ("ramp", 0.0),
        ("steps", -1),
        ("lr", 0.0),
        ("loss", "wgan"),
        ("schedule", "agp"),
        ("betas", (0.5, 1.5)),
    ],
)
def test_bad_options_name_the_option(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"sparsity": 0.5, field: value}
    with pytest.raises(RecipeError, match=field):
        GANCompressionOptions(**kwargs)


def test_protect_must_name_a_layer() -> None:
    generator, discriminator = _gan()
    options = GANCompressionOptions(0.5, steps=1, protect=("nope",))
    with pytest.raises(RecipeError, match="protect"):
        compress_generator(generator, discriminator, _real(), _latent, options)


@pytest.mark.parametrize("granularity", ["element", "filter"])
def test_compress_gan_compiles_and_matches_the_masked_generator(granularity: Any) -> None:
    generator, discriminator = _gan()
    options = GANCompressionOptions(0.5, granularity=granularity, steps=6, lr=1e-2)
    out = tilefx.compress_gan(generator, discriminator, _real(), _latent, options, (_latent(4),))
    shapes = {name: tuple(p.shape) for name, p in out.graph_module.named_parameters()}
    if granularity == "filter":  # physically smaller: 24 → 12 and 32 → 16 hidden units
        assert (
            shapes["0.weight"] == (12, LATENT)
            and shapes["2.weight"] == (16, 12)
            and shapes["4.weight"] == (16, 16)
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tilefx.CoverageWarning)  # filter: nothing block-sparse is left
        compiled = tilefx.compile(out.graph_module, target="llvm", fallback="never")
    z = _latent(5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(z), out.training.generator(z), rtol=1e-5, atol=1e-5)
