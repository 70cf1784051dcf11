"""TrainDSMPriorPass: MAP training under a Dirichlet scale mixture prior, then magnitude pruning.

The DSM paper (Arnstad et al., 2026) fits a one-hidden-layer MLP by NUTS under a node-wise
Dirichlet scale mixture prior on the first layer ``W1`` and prunes ``W1`` by posterior magnitude.
This pass is the scalable form of that recipe on a captured graph:

1. the chosen linear weights (the first linear in graph order, the paper's ``W1``, unless
   ``layers`` names others) each get a :class:`DSMPriorHook` (by default in the sampler's
   non-centred coordinates, latents started from the weights), whose ``-log p / N`` the
   one training loop (:mod:`.training.loop`) adds to the task loss of the labelled calibration
   batches; every floating parameter of the model trains, the prior's latents with them;
2. each chosen weight then keeps its ``1 − sparsity`` largest ``|w|`` (exactly
   ``round(sparsity · numel)`` zeroed, :func:`magnitude_mask`), the MAP stand-in for ``E_post|w|``;
3. the masks are recorded as :class:`BlockSparsity` with ``(1, 1)`` blocks, the element records
   ``PruneConnectionsPass`` writes for a linear, so the block-sparse lowering takes them unchanged.

numerics = "masked" against the pass's own output, as for :class:`RecoverSparsityPass`: the trained
weights are new, so what is checked is that the model equals itself with its recorded sparsity
applied (every dropped weight an exact zero).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx
import torch.nn as nn
import torch.utils._pytree as pytree

from tilefx.errors import RecipeError
from tilefx.options import option, options

from .analysis.weight_layers import WeightLayer, weight_layers
from .infra.analysis_manager import AnalysisManager
from .infra.pass_base import Numerics, PassBase, PassResult
from .infra.preconditions import require_aten_graph
from .metadata import BlockSparsity, Metadata, apply_masks, get_metadata, set_metadata
from .priors.dsm import DSMPriorHook, DSMSettings, MapForm, magnitude_mask
from .training.calibration import Calibration, check_batch_shapes
from .training.loop import Decay, LoopOptions, train

__all__ = ["DirichletScaleMixture", "TrainDSMPriorPass", "count_examples"]

log = logging.getLogger(__name__)


@options
class DirichletScaleMixture(LoopOptions, DSMSettings):
    """Train under a Dirichlet scale mixture prior, then prune the prior's layers by ``|w|``.

    The node-wise DSM prior of Arnstad et al. (2026) in its MAP form (docs/methods.md §4): the
    one training loop fits the model to the labelled calibration batches (their loss:
    cross-entropy, or a ``Calibration``'s own) plus ``-log p(W, latents) / N`` on each chosen
    linear weight, then each keeps its ``1 - sparsity`` largest ``|w|``; the zeros are recorded as
    (1, 1) blocks, which ``tilefx.compile`` lowers to block-sparse kernels. Needs calibration.
    The prior's hyperparameters are :class:`~.priors.dsm.DSMSettings`' (kind: "horseshoe", node
    scales λ ~ C⁺, or "student_t", λ ~ t₃⁺; alpha, p0, slab_a, slab_b, student_df: the paper's
    code's by default), the training's are :class:`~.training.loop.LoopOptions`' (steps, lr,
    optimizer, weight_decay, decay, seed, progress, ...). layers: parameter or module names of
    ``nn.Linear`` layers; empty means the first linear in graph order (the paper's first layer).
    examples: N in τ₀ = p₀/(P − p₀)/√N and in the prior's weight 1/N; None counts the calibration
    examples. form: "non_centred" (default) maximises the prior density of ``W/σ``, the sampler's
    coordinates; "centred" that of W, which tends to collapse every weight to zero
    (``DSMPriorHook``).
    """

    steps: int = option(default=500, ge=0)
    lr: float = option(default=1e-2, gt=0)
    decay: Decay = "constant"
    sparsity: float = option(default=0.8, ge=0, lt=1)
    layers: tuple[str, ...] = ()
    examples: int | None = option(default=None, ge=1)
    form: MapForm = "non_centred"


@dataclass(frozen=True)
class TrainDSMPriorPass(PassBase):
    """Train with the DSM prior on the chosen linear weights, then prune them by ``|w|``.

    ``prior`` says which weights (``layers``: parameter names ``"fc1.weight"`` or module names
    ``"fc1"`` of ``aten.linear`` weights; empty: the first linear in graph order), how sparse, the
    prior's hyperparameters and the training budget. The latents start at the scales the weights
    entering the pass imply (``init="weights"``).
    Requires: an ATen-level graph; labelled calibration batches shaped like the example inputs.
    """

    prior: DirichletScaleMixture
    calibration: Calibration = field(compare=False, hash=False)

    numerics: ClassVar[Numerics] = "masked"

    def requires(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> None:
        require_aten_graph(self.name, gm)

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        check_batch_shapes(self.calibration, am.example_inputs, "DirichletScaleMixture")
        chosen = self.chosen(gm)
        trained = self._train(gm, chosen)
        pruned = self._prune(gm, chosen) if self.prior.sparsity > 0 else False
        return PassResult(gm, trained or pruned)

    def _train(self, gm: torch.fx.GraphModule, chosen: list[WeightLayer]) -> bool:
        """Every floating parameter and the prior's latents, on the one loop; True if a step ran."""
        examples = self.prior.examples or count_examples(self.calibration)
        hooks = [
            DSMPriorHook(
                gm.get_parameter(layer.param), self.prior, examples, form=self.prior.form, init="weights"
            )
            for layer in chosen
        ]
        trainable = [p for p in gm.parameters() if p.is_floating_point()]
        flags = [p.requires_grad for p in trainable]
        for p in trainable:
            p.requires_grad_(True)
        latents = [p for hook in hooks for p in hook.parameters()]
        try:
            result = train(
                gm, _TaskLoss(self.calibration), self.calibration, self.prior, hooks, [*trainable, *latents]
            )
        finally:
            for p, flag in zip(trainable, flags, strict=True):
                p.requires_grad_(flag)
        if result.losses:
            log.info("%s: loss %.4g -> %.4g", self.name, result.losses[0], result.losses[-1])
        return bool(result.losses)

    def _prune(self, gm: torch.fx.GraphModule, chosen: list[WeightLayer]) -> bool:
        """Zero each chosen weight's smallest |w| and record (1, 1) blocks; True if anything changed."""
        metadata, changed = get_metadata(gm), False
        for layer in chosen:
            weight = gm.get_parameter(layer.param)
            keep = magnitude_mask(weight.detach().abs().cpu(), self.prior.sparsity)
            changed |= bool(weight.detach().cpu()[~keep].any()) or not _recorded(metadata, layer.param, keep)
            with torch.no_grad():
                weight.mul_(keep.to(weight.device, weight.dtype))
            metadata = metadata.with_annotation(layer.param, BlockSparsity((1, 1), keep))
            log.info("%s: %s keeps %d of %d weights", self.name, layer.param, int(keep.sum()), keep.numel())
        set_metadata(gm, metadata)
        return changed

    def masked_reference(
        self, before: torch.fx.GraphModule, after: torch.fx.GraphModule, example_inputs: Sequence[Any]
    ) -> torch.fx.GraphModule:
        """The pass's own output with its recorded sparsity applied (trained weights are new)."""
        return apply_masks(copy.deepcopy(after), after)

    def chosen(self, gm: torch.fx.GraphModule) -> list[WeightLayer]:
        """The linear layers the prior goes on; a name that is no linear weight is a RecipeError."""
        layers = weight_layers(gm)
        linears = [layer for layer in layers if layer.kind == "linear" and not layer.transposed]
        if not self.prior.layers:
            if not linears:
                raise RecipeError("DirichletScaleMixture: the model has no linear layer to put the prior on")
            return linears[:1]
        by_name = {layer.param: layer for layer in layers}
        found: list[WeightLayer] = []
        for name in self.prior.layers:
            layer = by_name.get(name) or by_name.get(f"{name}.weight")
            if layer is None or layer not in linears:
                known = ", ".join(repr(layer.param) for layer in linears)
                raise RecipeError(
                    f"DirichletScaleMixture.layers: {name!r} names no linear weight of the model (linears: {known})"
                )
            found.append(layer)
        return found


def _recorded(metadata: Metadata, name: str, keep: torch.Tensor) -> bool:
    records = metadata.of(name, BlockSparsity)
    return bool(records) and records[-1].block == (1, 1) and torch.equal(records[-1].mask.cpu(), keep)


def count_examples(data: Calibration) -> int:
    """Examples in one pass over ``data``: the leading size of each batch's first input tensor."""
    total = 0
    for inputs, _ in data:
        tensors = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
        total += int(tensors[0].shape[0]) if tensors and tensors[0].dim() > 0 else 1
    if total == 0:
        raise RecipeError("DirichletScaleMixture needs calibration batches, got none")
    return total


class _TaskLoss:
    """The calibration's loss (cross-entropy unless it names another) on labelled batches."""

    def __init__(self, data: Calibration) -> None:
        self.data = data

    def __call__(self, model: nn.Module, inputs: tuple[Any, ...], labels: Any) -> torch.Tensor:
        if labels is None:
            raise RecipeError(
                "DirichletScaleMixture trains on the task loss: give labelled calibration batches "
                "(inputs, labels), not labels=None"
            )
        return self.data.loss_of(model(*inputs), labels)
