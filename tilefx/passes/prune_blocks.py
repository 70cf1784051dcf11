"""PruneBlocksPass: zero the lowest-L1 blocks of every selected linear / conv / matmul weight.

The blocks are chosen in the weight's *current* coordinates: run after the TETRIS reordering has
been folded into the weights (``ReorderDimsPass``), they are the permuted coordinates, so the
reordering's work shows up as kept magnitude. Without reordering this is naive block pruning.

``block = (b_out, b_in)`` counts channels. A conv block spans the whole kernel, so on the matrix view
``weight.reshape(out, -1)`` (where :class:`BlockSparsity` lives) it is ``(b_out, b_in · kh · kw)``;
for a grouped conv ``b_in`` counts input channels within a group. A linear written as
``addmm`` / ``mm`` / ``matmul`` with a parameter stored ``[in, out]`` (GPT-2's ``Conv1D``) is
pruned on that stored view with the block turned, ``(b_in, b_out)`` (see ``passes.metadata``);
one read through a transpose (``x @ W.T``) is stored ``[out, in]`` like a linear's. Exactly ``floor(sparsity · #blocks)``
blocks are zeroed per layer (ties: lowest block index).

A weight whose dims the block does not divide is skipped (``indivisible="skip"``, the default; see
:meth:`PruneBlocksPass.plan`) with one :class:`CoverageWarning` per run that groups the skipped
layers by reason, or rejected (``"raise"``: :class:`RecipeError`). Layers the ``selection`` leaves
out are the user's choice and only logged. Padding is not offered here: :class:`BlockSparsity`
must tile the matrix view exactly for lowering.
NaN/inf weights raise :class:`WeightError`.

numerics = "masked": the output equals the input model with the recorded blocks zeroed.
Idempotent: on a second run the recorded blocks are already the lowest (all zero), the existing
record is kept and the pass reports ``modified=False``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import field
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.fx

from tilefx.errors import RecipeError
from tilefx.options import options

from .analysis.block_selection import block_sums, check_finite, check_sparsity, lowest_blocks
from .analysis.weight_layers import LayerPlan, LayerSelection, WeightLayer, WeightLayers, weight_layers
from .coverage import CoverageWarning, warn_coverage
from .infra.analysis_manager import AnalysisManager
from .infra.pass_base import Numerics, PassBase, PassResult
from .infra.preconditions import require_aten_graph
from .metadata import BlockSparsity, get_metadata, matrix_view, set_metadata

__all__ = ["PruneBlocksPass"]

log = logging.getLogger(__name__)


@options
class PruneBlocksPass(PassBase):
    """Block-prune linear/conv/matmul weights in their current coordinates.

    Requires: an ATen-level graph (checked: :class:`PreconditionError`).
    """

    block: tuple[int, int]
    sparsity: float
    selection: LayerSelection = field(default_factory=LayerSelection)
    indivisible: Literal["skip", "raise"] = "skip"

    numerics: ClassVar[Numerics] = "masked"

    def check(self) -> None:
        check_sparsity(self.sparsity, "PruneBlocksPass.sparsity")
        if min(self.block) < 1:
            raise RecipeError(
                f"PruneBlocksPass.block must be two positive sizes (b_out, b_in), got {self.block}"
            )

    def plan(self, gm: torch.fx.GraphModule, layers: Sequence[WeightLayer] | None = None) -> list[LayerPlan]:
        """Per weight layer (``layers``: ``gm``'s, when the caller has them): the sparsity it will
        get, or None and the reason it is skipped."""
        if layers is None:
            layers = weight_layers(gm, matmul_weights=True)
        plans = []
        for layer, sparsity, reason in self.selection.choose(layers, self.sparsity):
            problem = self._indivisible(layer) if sparsity is not None else ""
            if sparsity is not None:
                check_sparsity(sparsity, f"sparsity of {layer.param}")
            if problem and self.indivisible == "raise":
                raise RecipeError(f"PruneBlocksPass: {problem}; pick a dividing block or indivisible='skip'")
            if problem:
                plans.append(LayerPlan(layer.param, None, problem, indivisible=True))
            else:
                plans.append(LayerPlan(layer.param, sparsity, reason))
        return plans

    def requires(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> None:
        require_aten_graph(self.name, gm)

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        modified = False
        found = am.get(WeightLayers(matmul_weights=True))
        layers = {layer.param: layer for layer in found}
        if not layers:
            warnings.warn(
                f"{self.name}: the graph has no linear or conv weight", CoverageWarning, stacklevel=2
            )
        indivisible = []
        for plan in self.plan(gm, found):
            layer = layers[plan.param]
            if plan.sparsity is not None:
                modified |= self._prune(gm, layer, plan.sparsity)
                continue
            log.info("PruneBlocksPass: %s left dense: %s", plan.param, plan.reason)
            if plan.indivisible:
                indivisible.append(self._why_indivisible(layer))
        warn_coverage(
            f"PruneBlocksPass(block={self.block})",
            len(layers),
            "weight layers left dense",
            indivisible,
            "Pick a block that divides them, prune channels in the same Recipe (pruned channel counts "
            "then round to the block), or leave them out with a LayerSelection",
        )
        return PassResult(gm, modified)

    def matrix_block(self, layer: WeightLayer) -> tuple[int, int]:
        """The block on the stored parameter's matrix view, where the record lives."""
        return layer.stored_block(self.block)

    def _indivisible(self, layer: WeightLayer) -> str:
        out, cin = layer.out_channels, layer.in_channels
        if out % self.block[0] or cin % self.block[1]:
            return f"block {self.block} does not divide {layer.param} (out={out}, in per group={cin})"
        return ""

    def _why_indivisible(self, layer: WeightLayer) -> tuple[str, str]:
        """(the reason like layers share, the layer with its sizes) for the coverage warning."""
        out, cin = layer.out_channels, layer.in_channels
        sides = []
        if out % self.block[0]:
            sides.append("output channels")
        if cin % self.block[1]:
            sides.append("input channels per group")
        return f"block {self.block} does not divide their {' or '.join(sides)}", f"{layer.param} {out}x{cin}"

    def _prune(self, gm: torch.fx.GraphModule, layer: WeightLayer, sparsity: float) -> bool:
        weight = gm.get_parameter(layer.param)
        block = self.matrix_block(layer)
        magnitude = matrix_view(weight.detach()).abs().to("cpu", torch.float64).numpy()
        check_finite(magnitude, layer.param)
        sums = block_sums(magnitude, block)
        keep = lowest_blocks(sums, sparsity)
        metadata = get_metadata(gm)
        previous = [a for a in metadata.of(layer.param, BlockSparsity) if a.block == block]
        if previous and _still_optimal(previous[-1].mask.cpu().numpy(), keep, sums):
            return False
        mask = torch.from_numpy(keep)
        with torch.no_grad():
            element = BlockSparsity(block, mask).element_mask(weight.shape).to(weight.device)
            weight.mul_(element.to(weight.dtype))
        set_metadata(gm, metadata.with_annotation(layer.param, BlockSparsity(block, mask)))
        return True


def _still_optimal(previous: np.ndarray, keep: np.ndarray, sums: np.ndarray) -> bool:
    """The recorded mask prunes as many blocks as asked and nothing in them is left to zero."""
    return (
        previous.shape == keep.shape
        and int((~previous).sum()) == int((~keep).sum())
        and float(sums[~previous].sum()) == 0.0
    )
