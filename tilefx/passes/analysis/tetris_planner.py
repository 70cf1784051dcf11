"""TETRIS on a whole graph: one joint problem whose permutation variables are channel groups.

Each block-pruned weight is a TETRIS operand; its output axis is labelled with the channel group
its filters belong to and its input axis with the group(s) it reads (a concatenation gives a
block-diagonal :class:`Concat` axis, a grouped conv or a head split repeats one group per segment).
Because the variables are the groups that :class:`ReorderDimsPass` folds, the orders TETRIS picks
can be applied without any gather: this is the "optimised mode" of TETRIS in docs/methods.md
(α_l = β_(l−1), M-step cost summed over both tensors), a documented deviation from the authors'
per-tensor orders.
An axis whose group positions are strided (a flatten spreads a channel over H·W) stays out of the
objective; folding still moves it consistently.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np
import torch.fx

from ..graph_utils import attr_tensor
from ..training.loop import show_progress
from .block_selection import block_sums, num_pruned_blocks
from .channel_groups import ChannelGroup, ChannelGroups
from .tetris import FAST, TetrisOptions, tetris
from .tetris_problem import Concat, Operand
from .weight_layers import LayerSelection, weight_layers

__all__ = ["TetrisPlanner"]

log = logging.getLogger(__name__)


class TetrisPlanner:
    """An :data:`~tilefx.passes.reorder_dims.OrderPlanner` running TETRIS over coupled groups.

    ``progress``: tqdm bars while it runs (starting orders per group, then EM rounds), drawn only
    where the training loop would draw its bar (``show_progress``: stderr is a terminal, rank 0).
    """

    def __init__(
        self,
        block: tuple[int, int],
        sparsity: float,
        options: TetrisOptions = FAST,
        selection: LayerSelection | None = None,
        progress: bool = True,
    ) -> None:
        self.block, self.sparsity, self.options = block, sparsity, options
        self.selection = selection or LayerSelection()
        self.progress = progress

    def __call__(
        self, gm: torch.fx.GraphModule, groups: ChannelGroups, movable: Sequence[ChannelGroup]
    ) -> dict[int, np.ndarray]:
        allowed = {g.id for g in movable}
        parts: dict[tuple[str, int], list[tuple[int | None, np.ndarray]]] = defaultdict(list)
        for group in groups.groups:
            for s in group.slices:
                parts[(s.target, s.dim)].append((group.id if group.id in allowed else None, s.positions))
        operands = [op for op in self._operands(gm, parts) if op is not None]
        if not operands:
            return {}
        result = tetris(operands, self.sparsity, self.options, progress=show_progress(self.progress))
        identity = _identity_pruned_l1(operands, self.sparsity)
        log.info(
            "TETRIS: %d weights, %d groups: pruned L1 %.6g (no reorder: %.6g) in %d rounds, %.1f s",
            len(operands),
            len(result.orders),
            result.pruned_l1,
            identity,
            result.iterations,
            result.seconds,
        )
        if result.pruned_l1 >= identity:
            return {}  # a non-identity start can end in a worse optimum: never do worse than no reorder
        return {v: result.orders[v].numpy() for v in result.orders if isinstance(v, int)}

    def _operands(
        self, gm: torch.fx.GraphModule, parts: dict[tuple[str, int], list[tuple[int | None, np.ndarray]]]
    ) -> list[Operand | None]:
        operands: list[Operand | None] = []
        for layer, sparsity, _ in self.selection.choose(
            weight_layers(gm, matmul_weights=True), self.sparsity
        ):
            weight = attr_tensor(gm, layer.param).detach()
            block = self.block[::-1] if layer.transposed else self.block  # per stored axis
            if sparsity is None or weight.shape[0] % block[0] or weight.shape[1] % block[1]:
                continue
            axes = [_axis(parts.get((layer.param, d), []), weight.shape[d]) for d in (0, 1)]
            if axes == [None, None]:
                continue
            rest = weight.dim() - 2
            operands.append(
                Operand(
                    weight,
                    (*axes, *[None] * rest),
                    (*block, *[0] * rest),
                    sparsity=sparsity,
                    name=layer.param,
                )
            )
        return operands


def _axis(parts: list[tuple[int | None, np.ndarray]], size: int) -> Hashable | Concat | None:
    """The TETRIS label of one weight axis from the groups laid out along it."""
    segments = []
    for var, positions in parts:
        units = positions.shape[0]
        for column in positions.T:
            if not np.array_equal(column, column[0] + np.arange(units)):
                return None  # strided layout (flatten): leave this axis out of the objective
            segments.append((int(column[0]), var, units))
    laid: list[tuple[Hashable | None, int]] = []
    cursor = 0
    for start, var, length in sorted(segments, key=lambda s: s[0]):
        if start < cursor:
            return None
        if start > cursor:
            laid.append((None, start - cursor))
        laid.append((var, length))
        cursor = start + length
    if cursor < size:
        laid.append((None, size - cursor))
    if all(var is None for var, _ in laid):
        return None
    return laid[0][0] if len(laid) == 1 else Concat(tuple(laid))


def _identity_pruned_l1(operands: Sequence[Operand], sparsity: float) -> float:
    """TETRIS's objective with every order left as is (naive block pruning)."""
    total = 0.0
    for op in operands:
        magnitude = op.weight.detach().abs().double().numpy()
        sizes = [b or n for n, b in zip(magnitude.shape, op.block, strict=True)]
        sums = np.sort(block_sums(magnitude, sizes).ravel())
        total += float(
            sums[: num_pruned_blocks(sums.size, op.sparsity if op.sparsity is not None else sparsity)].sum()
        )
    return total
