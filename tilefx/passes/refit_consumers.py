"""RefitConsumersPass: after channel pruning, refit each layer that lost input channels by least squares.

Removing channels (FFN neurons, attention heads, conv filters) leaves every layer that read them
summing fewer inputs; its weights were trained for all of them. Kwon et al. ("A Fast Post-Training
Pruning Framework for Transformers", NeurIPS 2022) recover most of the loss without training by
solving a least-squares problem per layer on calibration data; here each consumer's remaining
weights (and bias) are refit to reproduce the *dense* layer's output from the *dense* input —
``min ‖W' X_s − W_d X_d‖²`` with ``X_s`` the layer's input in the pruned model and ``X_d`` in the
unpruned one — the same solve layer-wise reconstruction uses for block pruning
(:mod:`.training.reconstruct`), so each layer also absorbs the error of those before it. Layers
are refit in graph order, each on the model refit so far.

The teacher is the graph before the pipeline pruned it (``AnalysisManager.unpruned``); run alone,
the pass has none and says so. numerics = "masked" against its own output, as for the passes that
train: the refit weights are new, so what is checked is that the graph is well formed and its
recorded sparsity holds.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import field
from typing import Any, ClassVar, Literal

import torch
import torch.fx

from tilefx.errors import PreconditionError
from tilefx.options import option, options

from .analysis.weight_layers import WeightLayers
from .infra.analysis_manager import AnalysisManager
from .infra.pass_base import Numerics, PassBase, PassResult
from .metadata import ChannelSelection, apply_masks, get_metadata, matrix_view
from .recover_sparsity import token_mask_position
from .training.calibration import Calibration, check_batch_shapes
from .training.gradual_pruning import MaskedWeight
from .training.reconstruct import reconstruct

__all__ = ["RefitConsumersPass"]

log = logging.getLogger(__name__)


@options
class RefitConsumersPass(PassBase):
    """Refit every linear / ungrouped conv whose input channels were removed, on ``batches``
    calibration batches. Requires: a pipeline (the unpruned input is the teacher); calibration
    batches shaped like the example inputs. ``token_mask`` as in ``tilefx.Recovery``."""

    calibration: Calibration = field(compare=False, hash=False)
    batches: int = option(default=32, ge=1)
    token_mask: int | Literal["auto"] | None = option(default="auto", ge=0)
    progress: bool = True

    numerics: ClassVar[Numerics] = "masked"
    reads_unpruned: ClassVar[bool] = True

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        consumers = self._consumers(gm, am)
        if not consumers:
            return PassResult(gm, False)
        if am.unpruned is None:
            raise PreconditionError(
                self.name, consumers[0].name, "needs the unpruned model as its teacher",
                "run it in a PassManager (tilefx.optimize does), after the channel pruning",
            )  # fmt: skip
        check_batch_shapes(self.calibration, am.example_inputs, "ChannelPruning.refit")
        mask = token_mask_position(gm, am.example_inputs) if self.token_mask == "auto" else self.token_mask
        teacher = copy.deepcopy(am.unpruned).requires_grad_(False)
        refit = reconstruct(
            gm, teacher, consumers, self.calibration, self.batches, mask, progress=self.progress
        )
        log.info(
            "RefitConsumersPass: refit %d of %d layers that lost input channels", len(refit), len(consumers)
        )
        return PassResult(gm, bool(refit))

    def masked_reference(
        self, before: torch.fx.GraphModule, after: torch.fx.GraphModule, example_inputs: Sequence[Any]
    ) -> torch.fx.GraphModule:
        """The pass's own output with its recorded sparsity applied (refit weights are new)."""
        return apply_masks(copy.deepcopy(after), after)

    def _consumers(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> list[MaskedWeight]:
        """The layers channel pruning shrank along their input dim, as whole-matrix 'blocks' kept."""
        metadata = get_metadata(gm)
        found = []
        for layer in am.get(WeightLayers()):
            if not any(r.dim == 1 for r in metadata.of(layer.param, ChannelSelection)):
                continue
            weight = gm.get_parameter(layer.param)
            out, columns = matrix_view(weight).shape
            found.append(MaskedWeight(layer.param, weight, (out, columns), 0.0))
        return found
