"""Loss terms for recovery: the task loss, and distillation from the dense model (the teacher).

Scale matters more than the formula (measured on MiniLM by a prototype of this recovery): transformer
hidden states have a few huge outlier dimensions, so an absolute MSE is dominated by them. Every
matching term here is therefore *relative* — squared error divided by the teacher's energy — so
each tap and the output count alike whatever their scale, and a term is 0 exactly when the
student reproduces the teacher.

- ``relative_mse(s, t) = ‖s − t‖² / ‖t‖²``
- ``cosine_distance(s, t)``: mean over rows of the last dimension of ``1 − cos`` (per token for a
  sequence model, per sample for logits): the direction the downstream similarity reads.
- ``kl_divergence(s, t, T)``: Hinton's soft-target loss on logits, ``T² · KL(softmax(t/T) ‖ softmax(s/T))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["DistillLoss", "OutputLoss", "cosine_distance", "kl_divergence", "relative_mse"]

OutputLoss = Literal["mse", "cosine", "kl"]


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-12)


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    rows = teacher.shape[-1] if teacher.dim() else 1
    s, t = student.reshape(-1, rows), teacher.reshape(-1, rows)
    return (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-12)).mean()


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    rows = teacher.shape[-1]
    s = F.log_softmax(student.reshape(-1, rows) / temperature, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, rows) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


@dataclass(frozen=True)
class DistillLoss:
    """Student-vs-teacher loss on the model outputs and, optionally, on hidden taps.

    output: "mse" (relative MSE), "cosine" (relative MSE + cosine distance; for embeddings) or
    "kl" (soft targets; for logits). hidden: weight of the mean relative MSE over the taps.
    Only floating outputs are matched.
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
    ) -> torch.Tensor:
        pairs = [(s, t) for s, t in zip(student, teacher, strict=True) if t.is_floating_point()]
        loss = sum((self._output(s, t) for s, t in pairs), torch.zeros(()))
        if student_taps and self.hidden:
            taps = zip(student_taps, teacher_taps, strict=True)
            loss = loss + self.hidden * torch.stack([relative_mse(s, t) for s, t in taps]).mean()
        return loss

    def _output(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.output == "kl":
            return kl_divergence(student, teacher, self.temperature)
        loss = relative_mse(student, teacher)
        return loss + cosine_distance(student, teacher) if self.output == "cosine" else loss
