"""Train channel structure parameters with VR-PGE; leave the chosen mask in wrappers around the weights."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import field
from typing import Any, ClassVar

import torch
import torch.fx

from tilefx.options import option, options

from .analysis.channel_groups import ChannelGroupsAnalysis
from .analysis.shapes import Shapes
from .criteria.vrpge import VRPGEOptions, search_structure, unit_costs
from .handlers.api import Attention
from .infra.analysis_manager import AnalysisManager
from .infra.pass_base import Numerics, PassBase, PassResult
from .infra.preconditions import require_aten_graph
from .training.calibration import Calibration
from .training.structure_masks import wrap_channel_masks

__all__ = ["TrainStructureParamsPass"]

log = logging.getLogger(__name__)


@options
class TrainStructureParamsPass(PassBase):
    """VR-PGE (``tilefx.passes.criteria.vrpge``) on every prunable channel group of the graph.

    Wraps the groups' parameters in channel masks, trains weights and scores on ``calibration``
    (the one training loop), fixes a mask keeping ``1 − ratio`` of the budget and fine-tunes with
    it. The output still holds the wrappers (call_module nodes); MaterializeChannelMasksPass
    folds them away, then PruneChannelsPass with the criterion "vrpge" removes the masked units.

    Verified as "masked" against its own output: the weights are new, so the claim checked
    downstream is that the materialised and the pruned models compute what this one does.
    Requires: an ATen-level graph; calibration batches shaped like the example inputs.
    """

    ratio: float = option(ge=0, lt=1)
    calibration: Calibration = field(compare=False, hash=False)
    options: VRPGEOptions = field(default_factory=VRPGEOptions)
    skip: tuple[str, ...] = ()
    protect: tuple[str, ...] = ()
    attention: Attention = "head_dims"

    numerics: ClassVar[Numerics] = "masked"

    def requires(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> None:
        require_aten_graph(self.name, gm)

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        groups = [g for g in am.get(ChannelGroupsAnalysis(self.skip, self.protect, self.attention)).prunable()
                  if g.units > 1]  # fmt: skip
        if not groups or self.ratio == 0:
            return PassResult(gm, modified=False)
        shapes = am.get(Shapes())
        costs = {g.id: unit_costs(gm, g, self.options.budget, shapes) for g in groups}
        wrapped = wrap_channel_masks(gm, groups)
        search = search_structure(
            gm, wrapped, [costs[w.group.id] for w in wrapped], 1 - self.ratio, self.calibration, self.options
        )
        kept = sum(int(w.mask.mask.sum()) for w in wrapped)
        log.info("%s: %d of %d units kept in %d groups", self.name, kept, sum(search.sizes), len(wrapped))
        for p in gm.parameters():
            p.requires_grad_(False)
        return PassResult(gm, modified=True)

    def masked_reference(
        self, before: torch.fx.GraphModule, after: torch.fx.GraphModule, example_inputs: Sequence[Any]
    ) -> torch.fx.GraphModule:
        """The pass's own output (the weights were trained; the mask is in its wrappers)."""
        return copy.deepcopy(after)
