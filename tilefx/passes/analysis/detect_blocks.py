"""DetectBlocksPass: find block sparsity already in the weights, for models pruned elsewhere.

A model pruned by ``torch.ao.pruning``, Torch-Pruning or by hand holds its zeros but no
:class:`BlockSparsity` record, so lowering would see a dense model. This pass reads each weight
layer's matrix view (the view the records are stated in, ``passes.metadata``) and records, per
layer, the first block shape of ``candidates`` whose zero pattern tiles the weight: the all-zero
blocks of that shape hold (nearly) every zero of the weight. At most ``stray`` of the weight's
zeros may lie outside them, since a kept block may hold an incidental zero. Candidates count
channels ``(b_out, b_in)`` like ``PruneBlocksPass.block``; a conv block spans the whole kernel.

:data:`CANDIDATES` is ordered largest area first, and at equal area tall before wide
(``(16, 1)`` before ``(1, 16)``: the tall kernels are the faster ones on CPU), so "first that fits"
is "largest that fits". A weight with no all-zero block of any candidate (dense, or only
unstructured zeros) gets no record; a layer that already has a sparsity record keeps it.

Weights and graph are untouched (numerics "exact"); only the metadata gains records, and
``modified`` says whether it did.
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from tilefx.errors import RecipeError
from tilefx.options import option, options

from ..infra.analysis_manager import AnalysisManager
from ..infra.pass_base import PassBase, PassResult
from ..infra.preconditions import require_aten_graph
from ..metadata import BlockSparsity, ElementMask, NMSparsity, get_metadata, matrix_view, set_metadata
from .weight_layers import WeightLayer, weight_layers

__all__ = ["CANDIDATES", "DetectBlocksPass", "detect_block", "has_sparsity_records"]

log = logging.getLogger(__name__)

#: Block shapes tried, in channels ``(b_out, b_in)``: largest area first, tall before wide.
CANDIDATES: tuple[tuple[int, int], ...] = (
    (32, 32),
    (16, 16),
    (8, 8),
    (32, 1),
    (1, 32),
    (16, 1),
    (1, 16),
    (4, 4),
    (8, 1),
    (1, 8),
    (4, 1),
    (1, 4),
)


@options
class DetectBlocksPass(PassBase):
    """Record the block sparsity each linear / conv / matmul weight already has.

    Requires: an ATen-level graph (checked: :class:`PreconditionError`).
    Changes no weight and no node: only records are added to the metadata.
    """

    candidates: tuple[tuple[int, int], ...] = CANDIDATES
    stray: float = option(default=0.01, ge=0, lt=1)

    def check(self) -> None:
        if not self.candidates or any(min(b) < 1 for b in self.candidates):
            raise RecipeError(
                f"DetectBlocksPass.candidates must be pairs of positive sizes, got {self.candidates}"
            )

    def requires(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> None:
        require_aten_graph(self.name, gm)

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        metadata = get_metadata(gm)
        modified = False
        for layer in weight_layers(gm, matmul_weights=True):
            if _has_sparsity(metadata.params.get(layer.param, ())):
                continue
            record = detect_block(layer, gm.get_parameter(layer.param), self.candidates, self.stray)
            if record is None:
                continue
            log.info(
                "%s: %s has %s blocks at %.0f%%", self.name, layer.param, record.block, 100 * record.sparsity
            )
            metadata = metadata.with_annotation(layer.param, record)
            modified = True
        if modified:
            set_metadata(gm, metadata)
        return PassResult(gm, modified)


def detect_block(
    layer: WeightLayer,
    weight: torch.Tensor,
    candidates: tuple[tuple[int, int], ...] = CANDIDATES,
    stray: float = 0.01,
) -> BlockSparsity | None:
    """The record of the first candidate whose all-zero blocks hold the weight's zeros, or None."""
    zero = matrix_view(weight.detach()).eq(0).cpu()
    zeros = int(zero.sum())
    if zeros == 0:
        return None
    for channels in candidates:
        if layer.out_channels % channels[0] or layer.in_channels % channels[1]:
            continue
        rows, cols = layer.stored_block(channels)
        dropped = _all_zero_blocks(zero, rows, cols)
        covered = int(dropped.sum()) * rows * cols
        if covered and zeros - covered <= stray * zeros:
            return BlockSparsity((rows, cols), ~dropped)
    return None


def has_sparsity_records(gm: torch.fx.GraphModule) -> bool:
    """Whether any parameter of ``gm`` carries a sparsity record (block, N:M or element mask)."""
    return any(_has_sparsity(records) for records in get_metadata(gm).params.values())


def _all_zero_blocks(zero: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Bool grid ``[out / rows, rest / cols]``: True where the whole block is zero."""
    out, rest = zero.shape
    return zero.reshape(out // rows, rows, rest // cols, cols).all(dim=3).all(dim=1)


def _has_sparsity(records: object) -> bool:
    return isinstance(records, tuple) and any(
        isinstance(r, (BlockSparsity, NMSparsity, ElementMask)) for r in records
    )
