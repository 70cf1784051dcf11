"""A small SGD loop shared by the training-time methods (DCP's heads, sub-problems, fine-tunes).

Deliberately minimal: epochs over a :class:`Calibration`, one optimizer, an optional hook after
every step (DCP uses it to keep pruned channels at zero). Deterministic given the data order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from ..infra.errors import RecipeError
from .calibration import Calibration

__all__ = ["SGDOptions", "finetune", "make_sgd", "train_epochs"]

StepLoss = Callable[[tuple[Any, ...], Any], torch.Tensor]


@dataclass(frozen=True)
class SGDOptions:
    """SGD with Nesterov momentum; the defaults are DCP's (lr 0.01, momentum 0.9, wd 1e-4)."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    epochs: int = 1

    def __post_init__(self) -> None:
        if not self.lr > 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0 or self.epochs < 0:
            raise RecipeError(f"SGDOptions out of range: {self}")


def make_sgd(params: Iterable[torch.Tensor], options: SGDOptions) -> torch.optim.SGD:
    return torch.optim.SGD(
        list(params),
        lr=options.lr,
        momentum=options.momentum,
        weight_decay=options.weight_decay,
        nesterov=options.nesterov and options.momentum > 0,
    )


def train_epochs(
    params: Iterable[torch.Tensor],
    data: Calibration,
    loss_of_batch: StepLoss,
    options: SGDOptions,
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """``options.epochs`` passes of SGD on ``loss_of_batch``; returns each epoch's mean loss."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise RecipeError("nothing to train: no parameter requires grad")
    optimizer = make_sgd(params, options)
    history = []
    for _ in range(options.epochs):
        total, count = 0.0, 0
        for inputs, labels in data:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of_batch(inputs, labels)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            total, count = total + float(loss.detach()), count + 1
        if count == 0:
            raise RecipeError("training data yielded no batches (a generator used twice?)")
        history.append(total / count)
    return history


def finetune(gm: torch.fx.GraphModule, data: Calibration, options: SGDOptions) -> list[float]:
    """Train every parameter of ``gm`` in place on ``data.loss_of(gm(*inputs), labels)``."""
    for p in gm.parameters():
        p.requires_grad_(True)
    return train_epochs(
        gm.parameters(), data, lambda inputs, labels: data.loss_of(gm(*inputs), labels), options
    )
