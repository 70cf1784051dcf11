"""DSM prior: log density against a hand-composed scipy computation, MAP regulariser sanity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats

from tilefx.errors import RecipeError
from tilefx.passes.priors.dsm import (
    DSMLatents,
    DSMPriorHook,
    DSMSettings,
    dsm_log_prior,
    global_tau_scale,
    magnitude_mask,
)
from tilefx.passes.training.calibration import Calibration
from tilefx.passes.training.loop import LoopOptions, train


def _latents(hidden: int, inputs: int, seed: int) -> DSMLatents:
    g = torch.Generator().manual_seed(seed)
    return DSMLatents(
        tau=torch.rand((), generator=g, dtype=torch.float64) + 0.1,
        lam=torch.rand(hidden, generator=g, dtype=torch.float64) * 3 + 0.05,
        c2=torch.rand(hidden, generator=g, dtype=torch.float64) * 2 + 0.5,
        phi=torch.softmax(torch.randn(hidden, inputs, generator=g, dtype=torch.float64), dim=1),
    )


def _scipy_log_prior(w: np.ndarray, lat: DSMLatents, settings: DSMSettings, tau0: float) -> float:
    tau, lam, c2, phi = (np.asarray(t.detach()) for t in (lat.tau, lat.lam, lat.c2, lat.phi))
    hidden, inputs = w.shape
    s0 = 1 / math.sqrt(hidden) / math.sqrt(inputs) if settings.kind == "horseshoe" else 1.0
    lam_tilde = np.sqrt(c2 * lam**2 / (c2 + tau**2 * lam**2))
    total = 0.0
    for j in range(hidden):
        for i in range(inputs):
            total += stats.norm(0, s0 * tau * lam_tilde[j] * math.sqrt(phi[j, i])).logpdf(w[j, i])
        total += stats.dirichlet([settings.alpha] * inputs).logpdf(phi[j])
        total += stats.invgamma(settings.slab_a, scale=settings.slab_b).logpdf(c2[j])
        if settings.kind == "horseshoe":
            total += stats.halfcauchy(scale=1).logpdf(lam[j])
        else:
            total += math.log(2) + stats.t(settings.student_df).logpdf(lam[j])
    return total + float(stats.halfcauchy(scale=tau0).logpdf(tau))


@pytest.mark.parametrize("kind", ["horseshoe", "student_t"])
def test_log_prior_matches_scipy(kind: str) -> None:
    settings = DSMSettings(kind=kind)  # type: ignore[arg-type]
    hidden, inputs = 4, 6
    lat = _latents(hidden, inputs, seed=1)
    w = torch.randn(hidden, inputs, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.1
    tau0 = global_tau_scale(settings.p0, inputs, examples=100)
    got = float(dsm_log_prior(w, lat, settings, tau0))
    assert got == pytest.approx(_scipy_log_prior(w.numpy(), lat, settings, tau0), rel=1e-10)


def test_tau0_and_settings_validation() -> None:
    assert global_tau_scale(4, 30, 100) == pytest.approx(4 / 26 / 10)
    with pytest.raises(RecipeError, match="p0"):
        global_tau_scale(4, 4, 100)
    with pytest.raises(RecipeError, match="kind"):
        DSMSettings(kind="laplace")  # type: ignore[arg-type]


def test_regulariser_gradient_matches_finite_differences() -> None:
    layer = nn.Linear(5, 3).double()
    hook = DSMPriorHook(layer, DSMSettings(), examples=50)
    params = [layer.weight, *hook.parameters()]
    for p in params:
        p.data = p.data.double()

    # the analytic gradient is what backward() gives; compare it with central differences
    loss = hook.regularizer()
    grads = torch.autograd.grad(loss, params)
    eps = 1e-6
    for p, g in zip(params, grads, strict=True):
        flat = p.data.view(-1)
        for k in range(min(flat.numel(), 4)):
            old = float(flat[k])
            flat[k] = old + eps
            up = float(hook.regularizer().detach())
            flat[k] = old - eps
            down = float(hook.regularizer().detach())
            flat[k] = old
            assert float(g.view(-1)[k]) == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-7)
    # the prior pulls weights toward zero: the weight gradient has the weight's sign
    assert torch.all(grads[0] * layer.weight > 0)


def test_map_training_shrinks_irrelevant_inputs() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, 0] - 2 * x[:, 1]).unsqueeze(1)  # only inputs 0 and 1 matter
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 1))
    hook = DSMPriorHook(model[0], DSMSettings(kind="student_t"), examples=len(x))

    def objective(m: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(m(*inputs), labels)

    data = Calibration([((x[i : i + 64],), y[i : i + 64]) for i in range(0, 256, 64)])
    options = LoopOptions(steps=300, lr=3e-2, decay="constant", progress=False)
    train(model, objective, data, options, hooks=[hook], params=[*model.parameters(), *hook.parameters()])
    column = model[0].weight.detach().abs().sum(0)
    assert column[:2].min() > 3 * column[2:].max()
    mask = magnitude_mask(model[0].weight.detach().abs(), 0.75)
    assert int(mask.sum()) == 20
    assert mask[:, :2].sum() >= mask[:, 2:].sum()


def test_hook_state_round_trip() -> None:
    hook = DSMPriorHook(nn.Linear(6, 3), DSMSettings(), examples=10)
    state = hook.state_dict()
    with torch.no_grad():
        hook.log_lam.add_(1.0)
    hook.load_state_dict(state)
    torch.testing.assert_close(hook.log_lam.detach(), state["log_lam"])


@pytest.mark.parametrize("kind", ["horseshoe", "student_t"])
def test_weights_init_gives_scales_equal_to_the_weights(kind: str) -> None:
    weight = nn.Parameter(torch.randn(5, 8, generator=torch.Generator().manual_seed(3)))
    hook = DSMPriorHook(weight, DSMSettings(kind=kind), examples=100, init="weights")  # type: ignore[arg-type]
    scale = hook.latents().weight_scale(hook.settings).detach()
    torch.testing.assert_close(scale, weight.detach().abs(), rtol=2e-3, atol=2e-3)


def test_non_centred_density_is_the_centred_one_plus_the_log_scales() -> None:
    weight = nn.Parameter(torch.randn(4, 6, dtype=torch.float64) * 0.1)
    centred = DSMPriorHook(weight, DSMSettings(), examples=30)
    non_centred = DSMPriorHook(weight, DSMSettings(), examples=30, form="non_centred")
    scales = centred.latents().weight_scale(centred.settings)
    torch.testing.assert_close(non_centred.log_density(), centred.log_density() + scales.log().sum())
    with pytest.raises(RecipeError, match="form"):
        DSMPriorHook(weight, DSMSettings(), examples=30, form="half")  # type: ignore[arg-type]
