"""PruneConnectionsPass: zero whole connections (conv kernels ``W[o, i, :, :]``, linear entries ``W[o, i]``).

Criteria: ``"synaptic_strength"`` (post-training estimate |γ_i|·‖W[o,i]‖, see
``passes/analysis/connection_strength.py``; its [unverified] choices are :class:`StrengthOptions`) or
``"l1"`` (‖W[o,i]‖₁). Exactly ``floor(sparsity · N)`` connections are zeroed, where N counts the
connections of every selected layer (``scope="global"``: one ranking across layers, the reading of
"all connections with synaptic strength smaller than some threshold" [2nd, unverified that the
threshold is global]) or of each layer (``scope="layer"``; per-layer sparsities from
``LayerSelection.per_layer`` need this scope).

Each pruned weight gets :class:`BlockSparsity` with block ``(1, kh·kw)`` on the matrix view (a
connection is a contiguous 1×(kh·kw) run; ``(1, 1)`` for a linear). numerics = "masked".
Idempotent: ties prefer connections already recorded as pruned, so a second run chooses the same
set and reports ``modified=False``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import field
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.fx

from tilefx.errors import RecipeError
from tilefx.options import options

from .analysis.block_selection import check_finite, check_sparsity, lowest
from .analysis.connection_strength import StrengthOptions, connection_strength
from .analysis.weight_layers import LayerPlan, LayerSelection, WeightLayer, weight_layers
from .infra.analysis_manager import AnalysisManager
from .infra.pass_base import Numerics, PassBase, PassResult
from .infra.preconditions import require_aten_graph
from .metadata import BlockSparsity, get_metadata, set_metadata

__all__ = ["ConnectionCriterion", "PruneConnectionsPass"]

ConnectionCriterion = Literal["synaptic_strength", "l1"]

log = logging.getLogger(__name__)


@options
class PruneConnectionsPass(PassBase):
    """Connection (kernel-level) pruning to an exact sparsity.

    Requires: an ATen-level graph (checked: :class:`PreconditionError`).
    """

    sparsity: float
    criterion: ConnectionCriterion = "synaptic_strength"
    scope: Literal["global", "layer"] = "global"
    selection: LayerSelection = field(default_factory=LayerSelection)
    strength: StrengthOptions = field(default_factory=StrengthOptions)

    numerics: ClassVar[Numerics] = "masked"

    def check(self) -> None:
        check_sparsity(self.sparsity, "PruneConnectionsPass.sparsity")
        if self.scope == "global" and self.selection.per_layer:
            raise RecipeError("PruneConnectionsPass: per-layer sparsities need scope='layer'")

    def plan(self, gm: torch.fx.GraphModule) -> list[LayerPlan]:
        return [
            LayerPlan(layer.param, s, reason)
            for layer, s, reason in self.selection.choose(weight_layers(gm), self.sparsity)
        ]

    def scores(self, gm: torch.fx.GraphModule, layer: WeightLayer) -> np.ndarray:
        """The criterion for every connection of ``layer``: float64 ``[out, in/groups]``."""
        weight = gm.get_parameter(layer.param).detach()
        check_finite(weight.to("cpu", torch.float64).numpy(), layer.param)
        options = self.strength if self.criterion == "synaptic_strength" else StrengthOptions("none", "l1")
        return connection_strength(gm, layer, options).numpy()

    def requires(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> None:
        require_aten_graph(self.name, gm)

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        chosen = [
            (layer, s)
            for layer, s, _ in self.selection.choose(weight_layers(gm), self.sparsity)
            if s is not None
        ]
        if not chosen:
            return PassResult(gm, False)
        scores = [self.scores(gm, layer) for layer, _ in chosen]
        previous = [
            self._previously_pruned(gm, layer, score.shape)
            for (layer, _), score in zip(chosen, scores, strict=True)
        ]
        if self.scope == "global":
            keeps = _split(
                lowest(
                    np.concatenate([s.ravel() for s in scores]),
                    _count(scores, self.sparsity),
                    np.concatenate([p.ravel() for p in previous]),
                ),
                scores,
            )
        else:
            keeps = [
                lowest(s, _count([s], rate), p)
                for s, (_, rate), p in zip(scores, chosen, previous, strict=True)
            ]
        modified = False
        for (layer, _), keep in zip(chosen, keeps, strict=True):
            modified |= _apply(gm, layer, keep)
        return PassResult(gm, modified)

    @staticmethod
    def _previously_pruned(
        gm: torch.fx.GraphModule, layer: WeightLayer, shape: tuple[int, ...]
    ) -> np.ndarray:
        records = [a for a in get_metadata(gm).of(layer.param, BlockSparsity) if a.block == (1, layer.kernel)]
        if not records or tuple(records[-1].mask.shape) != shape:
            return np.zeros(shape, dtype=bool)
        return ~records[-1].mask.cpu().numpy().astype(bool)


def _count(scores: list[np.ndarray], sparsity: float) -> int:
    total = sum(s.size for s in scores)
    return min(total, math.floor(total * sparsity + 1e-9))


def _split(flat: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    bounds = np.cumsum([s.size for s in like])[:-1]
    return [part.reshape(s.shape) for part, s in zip(np.split(flat, bounds), like, strict=True)]


def _apply(gm: torch.fx.GraphModule, layer: WeightLayer, keep: np.ndarray) -> bool:
    """Zero the dropped connections and record them; False if weights and record are unchanged."""
    weight = gm.get_parameter(layer.param)
    record = BlockSparsity((1, layer.kernel), torch.from_numpy(keep))
    element = record.element_mask(weight.shape).to(weight.device)
    metadata = get_metadata(gm)
    old = metadata.of(layer.param, BlockSparsity)
    same_record = (
        bool(old) and old[-1].block == record.block and torch.equal(old[-1].mask.cpu().bool(), record.mask)
    )
    already_zero = not bool(weight.detach()[~element].any())
    if same_record and already_zero:
        return False
    with torch.no_grad():
        weight.mul_(element.to(weight.dtype))
    set_metadata(gm, metadata.with_annotation(layer.param, record))
    log.debug("PruneConnectionsPass: %s keeps %d of %d connections", layer.param, int(keep.sum()), keep.size)
    return True
