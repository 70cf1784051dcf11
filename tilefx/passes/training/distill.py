"""Loss terms for recovery: the task loss, and distillation from the dense model (the teacher).

Scale matters more than the formula (measured on MiniLM by a prototype of this recovery): transformer
hidden states have a few huge outlier dimensions, so an absolute MSE is dominated by them. Every
matching term here is therefore *relative* — squared error divided by the teacher's energy — so
each tap and the output count alike whatever their scale, and a term is 0 exactly when the
student reproduces the teacher.

- ``relative_mse(s, t) = ‖s − t‖² / ‖t‖²``
- ``cosine_distance(s, t)``: mean over rows of the last dimension of ``1 − cos`` (per token for a
  sequence model, per sample for logits): the direction the downstream similarity reads.
- ``pooled_cosine_distance(s, t, mask)``: ``1 − cos`` of the mean over the sequence (dimension 1,
  real tokens only): the sentence embedding a mean-pooling encoder is used through.
- ``kl_divergence(s, t, T)``: Hinton's soft-target loss on logits, ``T² · KL(softmax(t/T) ‖ softmax(s/T))``.

A *token mask* (``[batch, sequence]``, nonzero at real tokens: a tokenizer's attention mask) keeps
padding out of every term whose tensor starts with those two dimensions. Padding positions carry
values the model never uses, and matching them spends capacity on nothing (on MiniLM with
32-token batches, a third of the positions are padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "DistillLoss",
    "OutputLoss",
    "cosine_distance",
    "kl_divergence",
    "pooled_cosine_distance",
    "relative_mse",
]

OutputLoss = Literal["mse", "cosine", "pooled", "kl"]


def _token_weights(tensor: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` broadcast over ``tensor``'s trailing dimensions, or None when it does not apply."""
    if mask is None or tensor.dim() < 2 or tuple(tensor.shape[:2]) != tuple(mask.shape):
        return None
    return mask.to(tensor.dtype).reshape(*mask.shape, *([1] * (tensor.dim() - 2)))


def relative_mse(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    weights = _token_weights(teacher, mask)
    if weights is None:
        return (student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-12)
    return ((student - teacher).pow(2) * weights).sum() / (teacher.pow(2) * weights).sum().clamp_min(1e-12)


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    rows = teacher.shape[-1] if teacher.dim() else 1
    s, t = student.reshape(-1, rows), teacher.reshape(-1, rows)
    return (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-12)).mean()


def pooled_cosine_distance(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``1 − cos`` of the (masked) means over dimension 1, per sample; plain cosine below 3 dims."""
    if teacher.dim() < 3:
        return cosine_distance(student, teacher)
    weights = _token_weights(teacher, mask)
    if weights is None:
        weights = torch.ones_like(teacher[:, :, :1].reshape(*teacher.shape[:2], *([1] * (teacher.dim() - 2))))

    def pooled(x: torch.Tensor) -> torch.Tensor:
        return ((x * weights).sum(1) / weights.sum(1).clamp_min(1e-12)).flatten(1)

    return (1.0 - F.cosine_similarity(pooled(student), pooled(teacher), dim=-1, eps=1e-12)).mean()


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    rows = teacher.shape[-1]
    s = F.log_softmax(student.reshape(-1, rows) / temperature, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, rows) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


@dataclass(frozen=True)
class DistillLoss:
    """Student-vs-teacher loss on the model outputs and, optionally, on hidden taps.

    output: "mse" (relative MSE), "cosine" (relative MSE + per-row cosine distance), "pooled"
    (relative MSE + cosine distance of the sequence-mean-pooled outputs: for sentence encoders)
    or "kl" (soft targets; for logits). hidden: weight of the mean relative MSE over the taps.
    Only floating outputs are matched. ``mask`` (a token mask, see the module docstring) keeps
    padding out of the MSE terms and the pooling.
    """

    output: OutputLoss = "cosine"
    hidden: float = 1.0
    temperature: float = 1.0

    def __call__(
        self,
        student: Sequence[torch.Tensor],
        teacher: Sequence[torch.Tensor],
        student_taps: Sequence[torch.Tensor] = (),
        teacher_taps: Sequence[torch.Tensor] = (),
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        pairs = [(s, t) for s, t in zip(student, teacher, strict=True) if t.is_floating_point()]
        loss = sum((self._output(s, t, mask) for s, t in pairs), torch.zeros(()))
        if student_taps and self.hidden:
            taps = zip(student_taps, teacher_taps, strict=True)
            loss = loss + self.hidden * torch.stack([relative_mse(s, t, mask) for s, t in taps]).mean()
        return loss

    def _output(
        self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if self.output == "kl":
            return kl_divergence(student, teacher, self.temperature)
        loss = relative_mse(student, teacher, mask)
        if self.output == "cosine":
            return loss + cosine_distance(student, teacher)
        if self.output == "pooled":
            return loss + pooled_cosine_distance(student, teacher, mask)
        return loss
