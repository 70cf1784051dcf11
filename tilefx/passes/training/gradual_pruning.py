"""Block masks that follow a sparsity schedule during training: a :class:`LoopHook`.

Before each pruning step of the schedule the masks are re-selected from the *current* weights:
per layer, exactly ``floor(s_t · #blocks)`` blocks of the matrix view are dropped, the lowest by
score — block L1 magnitude (``score="magnitude"``), or block movement (``"movement"``: the sum of
``−W · ∂L/∂W`` accumulated over every step so far, Sanh et al. 2020, the score nn_pruning's block
movement pruning learns). Masks only grow: a dropped block stays dropped (it ranks first), so
sparsity is monotone as in Zhu & Gupta. After every optimiser step the masks are re-applied, so
dropped weights are exact zeros whenever the loop hands control back.

A connection (one conv kernel ``W[o, i]``, one linear entry) is the block ``(1, kh·kw)``, so the
same hook prunes connections gradually. Under ``torch.distributed`` every rank computes the masks
and then takes rank 0's, so they agree bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from ..analysis.block_selection import num_pruned_blocks
from ..metadata import BlockSparsity, matrix_view
from .loop import LoopHook, broadcast_from_rank0
from .sparsity_schedule import SparsitySchedule

__all__ = ["GradualBlockPruning", "MaskedWeight", "lowest_block_mask"]

Score = Literal["magnitude", "movement"]


@dataclass(frozen=True)
class MaskedWeight:
    """One pruned weight: its name, the parameter, its matrix-view block and final sparsity."""

    name: str
    weight: torch.nn.Parameter
    block: tuple[int, int]
    sparsity: float


class GradualBlockPruning(LoopHook):
    """Keep every weight in ``weights`` block-masked at ``schedule``'s sparsity (scaled per weight).

    ``schedule.target`` is the reference sparsity; a weight whose own target differs follows the
    same curve scaled to its target, so all reach their targets together at ``schedule.end``.
    """

    name = "gradual_block_pruning"

    def __init__(self, weights: list[MaskedWeight], schedule: SparsitySchedule, score: Score) -> None:
        self.weights = weights
        self.schedule = schedule
        self.score = score
        self.schedules = {w.name: _scaled(schedule, w.sparsity) for w in weights}
        self.masks = {w.name: _grid(w).new_ones(_grid(w).shape, dtype=torch.bool) for w in weights}
        self.movement = (
            {w.name: torch.zeros_like(matrix_view(w.weight), dtype=torch.float64) for w in weights}
            if score == "movement"
            else {}
        )
        self.current = {w.name: 0.0 for w in weights}
        self.elements: dict[str, torch.Tensor] = {}  # element masks in the weight's dtype, per mask

    # ---- LoopHook -------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        if self.schedule.prunes_at(step):
            self.prune_to({w.name: self.schedules[w.name].at(step) for w in self.weights})

    def after_backward(self, step: int) -> None:
        for w in self.weights:
            if w.name in self.movement and w.weight.grad is not None:
                self.movement[w.name] -= (
                    matrix_view(w.weight.detach()) * matrix_view(w.weight.grad)
                ).double()

    def after_step(self, step: int) -> None:
        self.apply()

    def progress(self) -> dict[str, float]:
        return {"sparsity": self.sparsity()}

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks, "movement": self.movement, "current": self.current}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.masks = {k: v.bool() for k, v in state["masks"].items()}
        self.elements = {}
        self.movement = dict(state["movement"])
        self.current = dict(state["current"])
        self.apply()

    # ---- masks ----------------------------------------------------------------------------
    def prune_to(self, sparsities: Mapping[str, float]) -> None:
        """Re-select every weight's mask at its sparsity (masks only grow), then apply them."""
        for w in self.weights:
            keep = self._select(w, sparsities[w.name])
            broadcast_from_rank0(keep)
            self.masks[w.name] = keep
            self.elements.pop(w.name, None)
            self.current[w.name] = sparsities[w.name]
        self.apply()

    def start_from(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Take ``masks`` (block keep-masks at each weight's final target, e.g. from layer-wise
        reconstruction) as already pruned; a later re-selection keeps them (dropped ranks first)."""
        for name, keep in masks.items():
            self.masks[name] = keep.to(self.masks[name].device, torch.bool)
            self.elements.pop(name, None)
            self.current[name] = next(w.sparsity for w in self.weights if w.name == name)
        self.apply()

    def finish(self) -> None:
        """Bring every mask to its final target (a run shorter than the schedule's ramp)."""
        if any(self.current[w.name] != w.sparsity for w in self.weights):
            self.prune_to({w.name: w.sparsity for w in self.weights})

    def apply(self) -> None:
        with torch.no_grad():
            for w in self.weights:
                if w.name not in self.elements:
                    self.elements[w.name] = self.record(w).element_mask(w.weight.shape).to(w.weight)
                w.weight.mul_(self.elements[w.name])

    def record(self, w: MaskedWeight) -> BlockSparsity:
        return BlockSparsity(w.block, self.masks[w.name])

    def sparsity(self) -> float:
        """Fraction of all masked weights' elements currently dropped."""
        total = sum(w.weight.numel() for w in self.weights)
        dropped = sum(
            w.weight.numel() * (1.0 - float(self.masks[w.name].float().mean())) for w in self.weights
        )
        return dropped / max(total, 1)

    def _select(self, w: MaskedWeight, sparsity: float) -> torch.Tensor:
        source = self.movement.get(w.name)
        values = matrix_view(w.weight.detach()).abs().double() if source is None else source
        return lowest_block_mask(values, w.block, sparsity, kept=self.masks[w.name])


def lowest_block_mask(
    values: torch.Tensor, block: tuple[int, int], sparsity: float, kept: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep-mask over the block grid of a ``[out, rest]`` score matrix: the ``floor(sparsity ·
    #blocks)`` blocks of lowest summed score dropped, ties to the lowest flat index. Blocks that
    ``kept`` (a previous keep-mask) already drops rank first, so masks only grow."""
    rows, cols = block
    out, rest = values.shape
    scores = values.reshape(out // rows, rows, rest // cols, cols).sum((1, 3)).flatten()
    if kept is not None:
        scores = scores.masked_fill(~kept.flatten(), -math.inf)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.argsort(scores, stable=True)[: num_pruned_blocks(scores.numel(), sparsity)]] = False
    return keep.reshape(out // rows, rest // cols)


def _grid(w: MaskedWeight) -> torch.Tensor:
    """An empty tensor shaped like ``w``'s block grid."""
    out, rest = matrix_view(w.weight).shape
    return torch.empty(out // w.block[0], rest // w.block[1], device=w.weight.device)


def _scaled(schedule: SparsitySchedule, target: float) -> SparsitySchedule:
    ratio = target / schedule.target if schedule.target else 0.0
    return replace(schedule, target=target, initial=schedule.initial * ratio)
