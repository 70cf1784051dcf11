"""Synaptic Strength training hook: exact reparameterisation, exact sparsity, fixed mask, materialise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tilefx.errors import RecipeError
from tilefx.passes.training.learned_strength import SynapticConv2d, SynapticStrengthHook


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12 * 16, 4),
    ).eval()


def test_prepare_is_exact_and_prune_hits_the_count() -> None:
    model, x = _model(), torch.randn(2, 3, 4, 4)
    hook = SynapticStrengthHook(sparsity=0.7, penalty=1e-3)
    wrapped = hook.prepare(model).eval()
    assert sum(isinstance(m, SynapticConv2d) for m in wrapped.modules()) == 2
    torch.testing.assert_close(wrapped(x), model(x), rtol=1e-5, atol=1e-6)
    assert float(hook.regularizer(wrapped).detach()) > 0
    pruned = hook.prune(wrapped)
    assert pruned == int(0.7 * (8 * 3 + 12 * 4))
    # a training step cannot revive a pruned connection
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    wrapped(x).sum().backward()
    opt.step()
    hook.post_step(wrapped)
    plain = hook.materialise(wrapped).eval()
    assert not any(isinstance(m, SynapticConv2d) for m in plain.modules())
    torch.testing.assert_close(plain(x), wrapped(x), rtol=1e-5, atol=1e-6)
    zero = sum(
        int((m.weight.flatten(2).abs().sum(2) == 0).sum())
        for m in plain.modules()
        if isinstance(m, nn.Conv2d)
    )
    assert zero == pruned


def test_per_layer_scope_and_bad_options() -> None:
    hook = SynapticStrengthHook(sparsity=0.5, scope="layer")
    wrapped = hook.prepare(_model())
    hook.prune(wrapped)
    assert [int((m.mask == 0).sum()) for m in wrapped.modules() if isinstance(m, SynapticConv2d)] == [12, 24]
    with pytest.raises(RecipeError):
        SynapticStrengthHook(sparsity=1.0)
    with pytest.raises(RecipeError, match="prepare"):
        hook.prune(_model())
