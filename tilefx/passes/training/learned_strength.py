"""Synaptic Strength, training-time form (Lin et al., NeurIPS 2018; ``docs/methods.md``; partly [unverified]).

Every conv kernel is reparameterised as ``K[o, i] = s[o, i] · V[o, i] / ‖V[o, i]‖_F`` with one learned
scalar per connection, the Synaptic Strength ``s`` [2nd: "reparameterizing individual kernels"]. The
training loop adds ``λ Σ |s|`` (:meth:`SynapticStrengthHook.regularizer`) to its loss [2nd: "an additional
penalty term that encourages a sparse distribution of synaptic strengths"]; then
:meth:`~SynapticStrengthHook.prune` zeroes the connections with the smallest |s| so that exactly
``floor(sparsity · N)`` are pruned, the mask is held fixed while fine-tuning
(:meth:`~SynapticStrengthHook.post_step`), and :meth:`~SynapticStrengthHook.materialise` folds each
reparameterised conv back into a plain ``nn.Conv2d`` whose pruned kernels are exact zeros.

[unverified], as options: whether ``s`` is free in sign (``signed=True``, default; ``s`` starts at
``‖V‖`` and |s| is what is ranked) or clamped ≥ 0 after every step (``signed=False``); λ (``penalty``); global vs
per-layer threshold (``scope``); whether the paper also drops the BN scale γ of the conv's input
("discarding batch normalization scaling factors" [2nd]) — not done here: γ is left to train as usual;
whether the first conv is included (``skip_first``). Training runs on the one training loop
(``loop.py``): :meth:`~SynapticStrengthHook.loop_hook` is the method as a :class:`LoopHook`
(regulariser, then the post-step projection), and :meth:`~SynapticStrengthHook.fit` runs the whole
method (prepare, penalised training, threshold, fixed-mask fine-tune, materialise). The post-training
estimate, which needs no training, is ``passes/analysis/connection_strength.py``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tilefx.errors import RecipeError
from tilefx.options import option, options

from ..analysis.block_selection import check_sparsity
from .calibration import Calibration
from .loop import LoopHook, LoopOptions, Objective, train

__all__ = ["StrengthTraining", "SynapticConv2d", "SynapticStrengthHook"]


class SynapticConv2d(nn.Module):
    """A conv with per-connection strength: ``K = s ⊙ V/‖V‖`` times a fixed 0/1 connection mask."""

    mask: torch.Tensor

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not isinstance(conv.padding, (tuple, int)):
            raise RecipeError(f"SynapticConv2d supports numeric padding only, got {conv.padding!r}")
        weight = conv.weight.detach().clone()
        self.direction = nn.Parameter(weight)
        self.strength = nn.Parameter(weight.flatten(2).norm(dim=2))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.register_buffer("mask", torch.ones_like(self.strength))
        self.stride, self.padding, self.dilation, self.groups = (
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )

    def kernel(self) -> torch.Tensor:
        norms = self.direction.flatten(2).norm(dim=2).clamp_min(1e-12)
        scale = self.strength * self.mask / norms
        return self.direction * scale[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def to_conv(self) -> nn.Conv2d:
        out, local, kh, kw = self.direction.shape
        layout: dict[str, Any] = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}
        conv = nn.Conv2d(
            local * self.groups, out, (kh, kw), groups=self.groups, bias=self.bias is not None, **layout
        )
        with torch.no_grad():
            conv.weight.copy_(self.kernel())
            if self.bias is not None and conv.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.to(self.direction.device)


@options
class SynapticStrengthHook:
    """The training-time method's pieces, and the method on the training loop.

    Use: ``model = hook.prepare(model)``; :func:`~tilefx.passes.training.loop.train` with
    ``hooks=[hook.loop_hook(model)]`` (adds ``hook.regularizer(model)``); ``hook.prune(model)``;
    fine-tune with ``hooks=[hook.loop_hook(model, penalise=False)]`` (``hook.post_step`` after each
    optimiser step); ``hook.materialise(model)``. :meth:`fit` does all of it.
    """

    sparsity: float
    penalty: float = option(default=1e-4, ge=0)
    scope: Literal["global", "layer"] = "global"
    skip_first: bool = False
    signed: bool = True

    def check(self) -> None:
        check_sparsity(self.sparsity, "SynapticStrengthHook.sparsity")

    def prepare(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with every (selected) ``nn.Conv2d`` replaced by a :class:`SynapticConv2d`."""
        model = copy.deepcopy(model)
        convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise RecipeError("SynapticStrengthHook.prepare: the model has no nn.Conv2d to reparameterise")
        for index, (name, conv) in enumerate(convs):
            if not (self.skip_first and index == 0):
                _set_submodule(model, name, SynapticConv2d(conv))
        return model

    def regularizer(self, model: nn.Module) -> torch.Tensor:
        """``λ Σ |s|`` over every reparameterised conv (add it to the task loss)."""
        terms = [m.strength.abs().sum() for m in _synaptic(model)]
        return self.penalty * torch.stack(terms).sum()

    def prune(self, model: nn.Module) -> int:
        """Fix the masks: exactly ``floor(sparsity · N)`` smallest-|s| connections off. Returns that count."""
        layers = _synaptic(model)
        with torch.no_grad():
            if self.scope == "global":
                scores = torch.cat([m.strength.abs().flatten() for m in layers])
                keep = _keep(scores, self.sparsity).split([m.strength.numel() for m in layers])
            else:
                keep = [_keep(m.strength.abs().flatten(), self.sparsity) for m in layers]
            for m, k in zip(layers, keep, strict=True):
                m.mask.copy_(k.reshape(m.mask.shape).to(m.mask.dtype))
            self.post_step(model)
        return sum(int((m.mask == 0).sum().item()) for m in layers)

    def post_step(self, model: nn.Module) -> None:
        """Hold pruned strengths at zero (the mask already removes them from the forward)."""
        with torch.no_grad():
            for m in _synaptic(model):
                m.strength.mul_(m.mask)
                if not self.signed:
                    m.strength.clamp_(min=0)

    def loop_hook(self, model: nn.Module, *, penalise: bool = True) -> StrengthTraining:
        """This method on the training loop for a :meth:`prepare`-d ``model``: ``λ Σ |s|`` as the
        regulariser when ``penalise`` and :meth:`post_step` after every optimiser step."""
        _synaptic(model)
        return StrengthTraining(self, model, penalise)

    def fit(
        self,
        model: nn.Module,
        data: Calibration,
        penalised: LoopOptions,
        finetune: LoopOptions,
        objective: Objective | None = None,
    ) -> nn.Module:
        """The whole method on ``model`` (not modified): train with the penalty (``penalised``),
        prune to the sparsity, fine-tune with the mask fixed (``finetune``), materialise plain convs.
        objective: ``(model, inputs, labels) -> loss``; default ``data``'s loss of the output."""
        loss = objective if objective is not None else _task_loss(data)
        work = self.prepare(model)
        train(work, loss, data, penalised, [self.loop_hook(work)])
        self.prune(work)
        train(work, loss, data, finetune, [self.loop_hook(work, penalise=False)])
        return self.materialise(work)

    def materialise(self, model: nn.Module) -> nn.Module:
        """A copy with every :class:`SynapticConv2d` folded back into a plain ``nn.Conv2d``."""
        model = copy.deepcopy(model)
        for name, m in list(model.named_modules()):
            if isinstance(m, SynapticConv2d):
                _set_submodule(model, name, m.to_conv())
        return model


class StrengthTraining(LoopHook):
    """:class:`SynapticStrengthHook` as a loop hook on a prepared model (see ``loop_hook``)."""

    name = "synaptic_strength"

    def __init__(self, method: SynapticStrengthHook, model: nn.Module, penalise: bool) -> None:
        self.method, self.model, self.penalise = method, model, penalise

    def regularizer(self) -> torch.Tensor | None:
        return self.method.regularizer(self.model) if self.penalise else None

    def after_step(self, step: int) -> None:
        self.method.post_step(self.model)

    def progress(self) -> dict[str, float]:
        masks = [m.mask for m in _synaptic(self.model)]
        return {"pruned": sum(float((m == 0).sum()) for m in masks) / sum(m.numel() for m in masks)}


def _task_loss(data: Calibration) -> Objective:
    def loss(model: nn.Module, inputs: tuple[Any, ...], labels: Any) -> torch.Tensor:
        return data.loss_of(model(*inputs), labels)

    return loss


def _synaptic(model: nn.Module) -> list[SynapticConv2d]:
    layers = [m for m in model.modules() if isinstance(m, SynapticConv2d)]
    if not layers:
        raise RecipeError("no SynapticConv2d in the model; call SynapticStrengthHook.prepare first")
    return layers


def _keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    count = min(scores.numel(), math.floor(scores.numel() * sparsity + 1e-9))
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.argsort(scores, stable=True)[:count]] = False
    return keep


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
