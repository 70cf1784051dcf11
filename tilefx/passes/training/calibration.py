"""Calibration data: labelled batches that data-driven criteria (Taylor, DCP) read, never train on.

A :class:`Calibration` wraps any re-iterable of ``(inputs, labels)`` batches (a list, a
``DataLoader``). ``inputs`` is one tensor or a tuple of model inputs. It compares by identity, so
analyses that hold one stay hashable and two different data sets never share a cached result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from tilefx.errors import RecipeError

__all__ = [
    "Batch",
    "Calibration",
    "LossFn",
    "as_calibration",
    "check_batch_shapes",
    "default_loss",
    "first_tensor",
]

LossFn = Callable[[Any, Any], torch.Tensor]
Batch = tuple[tuple[Any, ...], Any]


def first_tensor(output: Any) -> torch.Tensor:
    """The first floating tensor in a model output (a tensor, tuple, dict or dataclass of them)."""
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise RecipeError(f"model output {type(output).__name__} holds no floating tensor to take a loss of")


def default_loss(output: Any, labels: Any) -> torch.Tensor:
    """Cross-entropy of the output's first floating tensor (logits ``[N, classes]``) against labels.

    Sequence outputs ``[N, T, classes]`` with labels ``[N, T]`` are flattened over tokens.
    """
    logits = first_tensor(output)
    if logits.dim() > 2:
        logits = logits.reshape(-1, logits.shape[-1])
        labels = labels.reshape(-1)
    return F.cross_entropy(logits, labels)


@dataclass(frozen=True, eq=False)
class Calibration:
    """Labelled batches plus the loss to differentiate (cross-entropy unless ``loss`` is given).

    max_batches: read at most this many batches per pass over the data (None: all).
    """

    batches: Iterable[Any]
    loss: LossFn | None = None
    max_batches: int | None = None

    def __iter__(self) -> Iterator[Batch]:
        for i, batch in enumerate(self.batches):
            if self.max_batches is not None and i >= self.max_batches:
                return
            yield _split(batch, i)

    def loss_of(self, output: Any, labels: Any) -> torch.Tensor:
        return (self.loss or default_loss)(output, labels)


def as_calibration(data: Any, what: str) -> Calibration:
    """``data`` as a Calibration; ``what`` names the criterion that needs it in the error."""
    if isinstance(data, Calibration):
        return data
    if data is None:
        raise RecipeError(
            f"{what} needs calibration data: pass calibration=[(inputs, labels), ...] "
            "(or a DataLoader of labelled batches) to tilefx.optimize"
        )
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise RecipeError(
            f"{what}: calibration must be an iterable of (inputs, labels) batches, got {type(data).__name__}"
        )
    return Calibration(data)


def check_batch_shapes(data: Calibration, example_inputs: Any, who: str) -> None:
    """Training runs the captured (static-shape) graph: batch 0 must exist and match the example inputs."""
    first = next(iter(data), None)
    if first is None:
        raise RecipeError(f"{who} needs calibration batches, got none")
    got = [tuple(t.shape) for t in pytree.tree_leaves(first[0]) if isinstance(t, torch.Tensor)]
    want = [tuple(t.shape) for t in pytree.tree_leaves(tuple(example_inputs)) if isinstance(t, torch.Tensor)]
    if got != want:
        raise RecipeError(
            f"{who}: calibration inputs have shapes {got} but the example inputs {want}; the captured "
            "graph is static, so give batches shaped like the example inputs (same batch size and length)"
        )


def _split(batch: Any, index: int) -> Batch:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise RecipeError(
            f"calibration batch {index} must be a pair (inputs, labels), got {type(batch).__name__}"
        )
    inputs, labels = batch
    return ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)), labels
