"""The search's choice as verified passes: channels out, consumers refit, blocks pruned, formats narrowed.

Every change the search decided is made by the pass that makes it elsewhere in tilefx, in the
order the methods compose: physical channel removal (``PruneChannelsPass``, the channel units the
greedy OBS order put first) and the least-squares refit of their consumers
(``RefitConsumersPass``); block sparsity with OBS selection and refit, one pass per block shape
(``RecoverSparsityPass`` with a layer-wise reconstruction and no training); number formats last
(``QuantizeLinearsPass``, the layers left fp32 kept). Each is verified like any other pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx

from ..analysis.channel_groups import ChannelGroupsAnalysis
from ..analysis.weight_layers import LayerSelection, WeightLayers
from ..cleanup import EliminateDeadCodePass
from ..criteria import ChannelScores
from ..infra.analysis_manager import Analysis, AnalysisManager
from ..infra.pass_base import PassBase
from ..prune_channels import PruneChannelsPass
from ..quantize_linears import Quantization, QuantizeLinearsPass
from ..recover_sparsity import RecoverSparsityPass, Recovery
from ..refit_consumers import RefitConsumersPass
from ..training.calibration import Calibration
from .losses import Option, removed_count
from .units import Unit, search_units

__all__ = ["ChosenChannels", "passes_for"]


@dataclass(frozen=True)
class ChosenChannels(Analysis[ChannelScores]):
    """Scores that make ``PruneChannelsPass`` remove exactly the chosen channel units: per structured
    unit (named by its consumer), the units to drop score 0 and the rest 1, with the kept count as
    ``keep``; every other group keeps all its units."""

    drop: Mapping[str, tuple[int, ...]] = field(hash=False, compare=False)
    key: tuple[tuple[str, tuple[int, ...]], ...] = ()
    attention: str = "heads"

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> ChannelScores:
        groups = am.get(ChannelGroupsAnalysis(attention=self.attention))  # type: ignore[arg-type]
        found = am.get(WeightLayers())
        units = {u.group: u for u in search_units(groups, list(found)) if u.structured}
        scores, keep = {}, {}
        for group in groups.prunable():
            score = np.ones(group.units)
            unit = units.get(group.id)
            dropped = self.drop.get(unit.consumer or "", ()) if unit is not None else ()
            score[list(dropped)] = 0.0
            scores[group.id], keep[group.id] = (
                torch.as_tensor(score, dtype=torch.float64),
                group.units - len(dropped),
            )
        return ChannelScores("search", scores, keep)


def passes_for(
    units: Sequence[Unit],
    chosen: Mapping[str, Option],
    orders: Mapping[str, tuple[int, ...]],
    calibration: Calibration,
    refit_batches: int,
    attention: str = "heads",
    progress: bool = True,
) -> list[PassBase]:
    """The passes that make ``chosen`` (unit name → option) of ``units``, in composing order."""
    passes: list[PassBase] = []
    drop = {
        unit.consumer: orders[unit.name][: removed_count(unit, chosen[unit.name].keep)]
        for unit in units
        if unit.structured and unit.consumer is not None and chosen[unit.name].keep < 1.0
    }
    if drop:
        scores = ChosenChannels(drop, tuple(sorted(drop.items())), attention)
        passes += [
            PruneChannelsPass(ratio=0.0, attention=attention, scores=scores),  # type: ignore[arg-type]
            EliminateDeadCodePass(),
            RefitConsumersPass(calibration, batches=refit_batches, progress=progress),
        ]
    for block in sorted({o.block for o in chosen.values() if o.block is not None}):
        per_layer = {
            param: option.sparsity
            for unit in units
            for param in unit.layers
            if (option := chosen[unit.name]).block == block
        }
        selection = LayerSelection(per_layer=per_layer, only=tuple(per_layer))
        recovery = Recovery(schedule="oneshot", reconstruct=refit_batches, steps=0, progress=progress)
        passes.append(RecoverSparsityPass(recovery, calibration, block=block, selection=selection))
    for fmt in sorted({o.format for o in chosen.values()} - {"fp32"}):
        narrow = {param for unit in units for param in unit.layers if chosen[unit.name].format == fmt}
        every = {param for unit in units for param in unit.layers}
        passes.append(QuantizeLinearsPass(Quantization(format=fmt, keep=tuple(sorted(every - narrow)))))  # type: ignore[arg-type]
    return passes
