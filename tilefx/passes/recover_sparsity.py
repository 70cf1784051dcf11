"""RecoverSparsityPass: prune blocks *while* training the model back toward the dense one.

One-shot block pruning at high sparsity wrecks a pretrained model (MiniLM at 80% 16×1: cosine to
dense ~0.2). Real pruning tools prune during training, usually against the dense model as a
teacher (Zhu & Gupta 2017; nn_pruning; oBERT); this pass does the same inside the pipeline:

1. the teacher is a frozen copy of the graph as it enters (after batch-norm folding and the TETRIS
   orders, which are exact, so it *is* the dense model, in the same coordinates as the student);
2. the loop (:mod:`.training.loop`) trains every parameter on the calibration batches: the task
   loss for batches with labels, distillation (:mod:`.training.distill`) from the teacher for
   batches without (``labels=None``) or whenever ``distill`` is set — on the outputs, and with
   ``distill="hidden"`` also on hidden taps (``hidden_taps``: the inputs of the pruned layers, their
   outputs, or the normalisation layers' outputs — in a transformer, the residual stream after
   every block); with ``token_mask`` naming the input that holds a tokenizer's attention mask,
   padding positions are left out of every term;
3. block masks follow the schedule (:mod:`.training.sparsity_schedule`; ``"gradual"``: Zhu &
   Gupta's cubic ramp over the first ``ramp`` of the steps, re-selected every ``every`` steps
   from the current weights, see :mod:`.training.gradual_pruning`) and are re-applied after every
   optimiser step; sparsity records already in the metadata (an earlier pass's) are held too;
   With ``reconstruct=N`` (one-shot only) the masks are instead chosen, and the kept weights
   refit, layer by layer on N calibration batches before training (:mod:`.training.reconstruct`):
   training then starts from a model that already matches the dense one layer by layer;
4. the final masks are recorded as :class:`BlockSparsity` exactly as ``PruneBlocksPass`` records
   them, so lowering is unchanged.

``block = (b_out, b_in)`` counts channels as in ``PruneBlocksPass`` (a conv block spans the
kernel); ``(1, 1)`` prunes connections. numerics = "masked" against the pass's *own* output: the
trained weights are new, so what is checked is that the model equals itself with its recorded
sparsity applied (every dropped weight an exact zero).
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
import torch.fx
import torch.nn as nn
import torch.utils._pytree as pytree

from tilefx.errors import RecipeError
from tilefx.options import option, options

from .analysis.weight_layers import LayerSelection, weight_layers
from .graph_utils import param_node
from .infra.analysis_manager import AnalysisManager
from .infra.pass_base import Numerics, PassBase, PassResult
from .metadata import BlockSparsity, ChannelSelection, Permutation, apply_masks, get_metadata, set_metadata
from .prune_blocks import PruneBlocksPass
from .training.calibration import Calibration, check_batch_shapes
from .training.distill import DistillLoss, OutputLoss
from .training.gradual_pruning import GradualBlockPruning, MaskedWeight, Score
from .training.keep_best import KeepBest, held_out
from .training.loop import LoopHook, LoopOptions, LoopResult, checkpoint_path, train
from .training.reconstruct import reconstruct
from .training.sparsity_schedule import SparsitySchedule
from .training.taps import Tapped

__all__ = ["HiddenTaps", "RecoverSparsityPass", "Recovery", "token_mask_position"]

HiddenTaps = Literal["inputs", "outputs", "norms"]
_NORMS = frozenset(
    {
        torch.ops.aten.layer_norm.default,
        torch.ops.aten.group_norm.default,
        torch.ops.aten.rms_norm.default,
    }
)

log = logging.getLogger(__name__)

#: Calibration batches ``Recovery()`` refits on by default (one-shot schedule).
DEFAULT_RECONSTRUCT = 32
#: Held-out batches ``Recovery()`` checks training on by default (with at least 4x as many given).
DEFAULT_CHECK = 4


@options
class Recovery(LoopOptions):
    """Train while pruning, so the pruned model still works: needs ``optimize(..., calibration=...)``.

    Batches are ``(inputs, labels)`` shaped like the example inputs; ``labels=None`` means unlabeled:
    the model then learns from the dense model (distillation). The training loop's options
    (:class:`~.training.loop.LoopOptions`: steps, lr, optimizer, warmup, decay, accumulate, seed,
    checkpoint_dir, progress, ...) are this class's too: steps counts optimiser steps (each of
    ``accumulate`` batches); lr warms up over ``warmup`` of the steps, then ``decay``s;
    checkpoint_dir: save every ``checkpoint_every`` steps, and a rerun resumes there; progress: a
    tqdm bar with the live loss and sparsity, when stderr is a terminal.
    schedule: "gradual" raises sparsity along Zhu & Gupta's cubic curve over the first ``ramp``
    of the steps, re-selecting masks from the current weights every ``every`` steps by ``score``
    ("magnitude" or "movement"); "oneshot" prunes at step 0 and trains with the masks fixed.
    distill: "output", "hidden" (outputs plus the hidden taps below) or None (labels only);
    output_loss: "cosine" (relative MSE + cosine, for embeddings), "mse", "kl" (for logits) or
    "pooled" (relative MSE + cosine of the sequence-mean-pooled outputs: sentence encoders).
    hidden_taps: what distill="hidden" matches — the pruned layers' "inputs", their "outputs", or
    every normalisation's output ("norms", the default: a transformer's residual stream; the
    pruned layers' inputs when the model has no normalisation). trainable: every parameter
    ("all"), or only the linear/conv layers' weights and biases ("layers").
    token_mask: position of the attention-mask tensor among the flattened example inputs (1 for
    ``BertModel(input_ids, attention_mask)``), whose padding is then left out of every loss term
    and of the reconstruction; "auto" (the default) finds it (:func:`token_mask_position`: an
    input named ``attention_mask``, else a 0/1 integer tensor shaped like the token ids), None
    uses every position.
    reconstruct: with schedule="oneshot", choose the blocks and refit the kept weights layer by
    layer on this many calibration batches before training (Optimal Brain Surgeon saliency, least
    squares against the dense layer's output); 0: magnitude, no refit; None (the default): 32
    with "oneshot", 0 with "gradual". Best with a pretrained model and little training time;
    nothing to do when the recipe prunes no blocks (channels alone).
    check_batches: hold the last this-many calibration batches out of training and measure the objective
    on them before the first step (once the schedule reaches its sparsity) and every
    ``check_every`` steps; the run returns the weights of the best measurement, its start if
    training never beat it (``training.keep_best``). 0: no check, the last step's weights; None
    (the default): 4 when the calibration holds at least 16 batches, else no check.

    The defaults are the best recipe measured on a pretrained model for their budget
    (docs/recovery.md, ``benchmarks/recovery_defaults.py``): prune at once, refit every layer by
    least squares on 32 batches, then 300 steps of distillation at lr 1e-3 decaying to 0, checked
    on 4 held-out batches so that training can only keep or improve the refit model.
    """

    steps: int = option(default=300, ge=0)
    lr: float = option(default=1e-3, gt=0)
    warmup: float = option(default=0.0, ge=0, lt=1)
    schedule: Literal["gradual", "oneshot"] = "oneshot"
    distill: Literal["output", "hidden"] | None = "hidden"
    output_loss: OutputLoss = "cosine"
    score: Score = "magnitude"
    trainable: Literal["all", "layers"] = "all"
    ramp: float = option(default=0.6, ge=0, le=1)
    every: int = option(default=10, ge=1)
    hidden_taps: HiddenTaps = "norms"
    token_mask: int | Literal["auto"] | None = option(default="auto", ge=0)
    reconstruct: int | None = option(default=None, ge=0)
    check_batches: int | None = option(default=None, ge=0)
    check_every: int = option(default=50, ge=1)

    def normalize(self) -> None:
        if self.reconstruct is None:  # the default: refit when pruning at once, never while ramping
            object.__setattr__(self, "reconstruct", DEFAULT_RECONSTRUCT if self.schedule == "oneshot" else 0)

    def check(self) -> None:
        if self.reconstruct and self.schedule != "oneshot":
            raise RecipeError(
                f"Recovery.reconstruct={self.reconstruct} prunes every layer to its target before training, "
                f'which a gradual schedule contradicts: set schedule="oneshot" or reconstruct=0'
            )


@dataclass(frozen=True)
class RecoverSparsityPass(PassBase):
    """Gradual (or one-shot) block pruning with recovery training, as ``recovery`` says. Requires:
    calibration batches shaped like the example inputs (the captured graph is static).
    ``block=None`` only trains, holding the sparsity already recorded. ``taps``: the hidden taps
    to distil, when given, instead of those ``recovery.hidden_taps`` chooses."""

    recovery: Recovery
    calibration: Calibration = field(compare=False, hash=False)
    block: tuple[int, int] | None = None
    sparsity: float = 0.0
    taps: tuple[str, ...] = ()
    selection: LayerSelection = field(default_factory=LayerSelection)

    numerics: ClassVar[Numerics] = "masked"
    reads_unpruned: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.block is not None:
            PruneBlocksPass(self.block, self.sparsity, self.selection)  # validates block and sparsity

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        check_batch_shapes(self.calibration, am.example_inputs, "recovery")
        token_mask = self._token_mask(gm, am.example_inputs)
        masked = self._masked_weights(gm)
        if not masked and self.recovery.steps == 0:
            return PassResult(gm, False)
        teacher = copy.deepcopy(gm).requires_grad_(False)
        pruning = GradualBlockPruning(masked, self._schedule(), self.recovery.score)
        batches = self.recovery.reconstruct or 0
        if batches and self.block is not None and not self._resuming():
            keep = reconstruct(
                gm,
                teacher,
                masked,
                self.calibration,
                batches,
                token_mask,
                progress=self.recovery.progress,
            )
            pruning.start_from(keep)
            log.info("RecoverSparsityPass: reconstructed %d of %d pruned layers", len(keep), len(masked))
        hooks: list[LoopHook] = [pruning, _HeldSparsity(gm)]
        result = None
        if self.recovery.steps:
            distill_from = self._distillation_teacher(gm, am, teacher)
            result = self._train(gm, distill_from, hooks, token_mask, distill_from is teacher)
        pruning.finish()
        metadata = get_metadata(gm)
        for w in masked:
            metadata = metadata.with_annotation(w.name, BlockSparsity(w.block, pruning.masks[w.name].cpu()))
        if result is not None:
            metadata = replace(metadata, recovery_losses=(*metadata.recovery_losses, *result.losses))
        set_metadata(gm, metadata)
        if result is not None and result.losses:
            log.info("RecoverSparsityPass: loss %.4g -> %.4g", result.losses[0], result.losses[-1])
        return PassResult(gm, True)

    def masked_reference(
        self, before: torch.fx.GraphModule, after: torch.fx.GraphModule, example_inputs: Sequence[Any]
    ) -> torch.fx.GraphModule:
        """The pass's own output with its recorded sparsity applied (trained weights are new)."""
        return apply_masks(copy.deepcopy(after), after)

    def _resuming(self) -> bool:
        """A checkpoint will overwrite the weights and masks: reconstructing first would be wasted."""
        path = checkpoint_path(self.recovery)
        return self.recovery.steps > 0 and path is not None and path.exists()

    def _schedule(self) -> SparsitySchedule:
        end = round(self.recovery.ramp * self.recovery.steps) if self.recovery.schedule == "gradual" else 0
        return SparsitySchedule(
            self.sparsity, end=end, every=self.recovery.every, kind=self.recovery.schedule
        )

    def _masked_weights(self, gm: torch.fx.GraphModule) -> list[MaskedWeight]:
        if self.block is None:
            return []
        pruner = PruneBlocksPass(self.block, self.sparsity, self.selection)
        layers = {layer.param: layer for layer in weight_layers(gm)}
        return [
            MaskedWeight(p.param, gm.get_parameter(p.param), pruner.matrix_block(layers[p.param]), p.sparsity)
            for p in pruner.plan(gm)
            if p.sparsity is not None
        ]

    @staticmethod
    def _distillation_teacher(
        gm: torch.fx.GraphModule, am: AnalysisManager, entering: torch.fx.GraphModule
    ) -> torch.fx.GraphModule:
        """The model to learn from: the graph as it entered this pass, unless channels were removed
        before it — then the model before the pipeline pruned it, or training would only recover
        the channel-pruned model it starts from."""
        records = get_metadata(gm).params.values()
        channels_pruned = any(isinstance(r, ChannelSelection) for rs in records for r in rs)
        if not channels_pruned or am.unpruned is None:
            return entering
        return copy.deepcopy(am.unpruned).requires_grad_(False)

    def _token_mask(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> int | None:
        """The position of the token mask among the flattened inputs: given, found, or none."""
        given = self.recovery.token_mask
        if given == "auto":
            found = token_mask_position(gm, example_inputs)
            log.info(
                "RecoverSparsityPass: token mask %s", "not found" if found is None else f"at input {found}"
            )
            return found
        _check_token_mask(given, example_inputs)
        return given

    def _train(
        self,
        gm: torch.fx.GraphModule,
        teacher: torch.fx.GraphModule,
        hooks: list[LoopHook],
        token_mask: int | None,
        same_coordinates: bool = True,
    ) -> LoopResult:
        taps = self._taps(gm) if self.recovery.distill == "hidden" else ()
        if not same_coordinates:
            taps = _comparable_taps(gm, teacher, taps, self.calibration)
        student = Tapped(gm, taps)
        objective = _Objective(
            Tapped(teacher, taps),
            len(student.taps),
            self._distill_loss(),
            self.calibration,
            token_mask,
        )
        trained = self._trained(gm)
        for name, p in gm.named_parameters():
            p.requires_grad_(name in trained)
        log.info(
            "RecoverSparsityPass: %d steps, %d hidden taps, %d parameters trained",
            self.recovery.steps,
            len(taps),
            len(trained),
        )
        data = self.calibration
        held = self.recovery.check_batches
        if held is None:  # the default: a check only where it leaves enough to train on
            enough = len(list(itertools.islice(self.calibration, 4 * DEFAULT_CHECK))) == 4 * DEFAULT_CHECK
            held = DEFAULT_CHECK if enough else 0
        if held:
            kept, check = held_out(list(self.calibration), held)
            if not check or not kept:
                raise RecipeError(
                    f"Recovery.check_batches={held} holds out every calibration batch: "
                    "give more batches or hold out fewer"
                )
            data = Calibration(kept, self.calibration.loss)

            def evaluate() -> float:
                return sum(float(objective(student.module, tuple(x), y)) for x, y in check) / len(check)

            start = self._schedule().end if self.block is not None else 0  # once at the target sparsity
            hooks = [
                *hooks,
                KeepBest(student.module, evaluate, self.recovery.steps, self.recovery.check_every, start),
            ]
        return train(student.module, objective, data, self.recovery, hooks)

    def _trained(self, gm: torch.fx.GraphModule) -> set[str]:
        """Every floating parameter, or (``trainable="layers"``) the linear/conv weights and biases:
        embeddings and norms then stay as the dense model has them, so a small corpus cannot drift
        the embeddings of the words it happens to contain."""
        floating = {name for name, p in gm.named_parameters() if p.is_floating_point()}
        if self.recovery.trainable == "all":
            return floating
        layers = weight_layers(gm)
        biases = {param_node(layer.node.args[2]) for layer in layers if len(layer.node.args) > 2}
        return floating & ({layer.param for layer in layers} | {b for b in biases if b is not None})

    def _distill_loss(self) -> DistillLoss | None:
        if self.recovery.distill is None:
            return None
        return DistillLoss(
            self.recovery.output_loss, hidden=1.0 if self.recovery.distill == "hidden" else 0.0
        )

    def _taps(self, gm: torch.fx.GraphModule) -> tuple[str, ...]:
        """``taps`` as given, else by ``hidden_taps``: the distinct inputs of the pruned layers that
        are not model inputs, their outputs, or every normalisation's output (the pruned layers'
        inputs when the graph has no normalisation)."""
        if self.taps:
            return self.taps
        if self.recovery.hidden_taps == "norms":
            norms = tuple(n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in _NORMS)
            if norms:
                return norms
        pruned = {w.name for w in self._masked_weights(gm)}
        found: dict[str, None] = {}
        for layer in weight_layers(gm):
            if layer.param not in pruned:
                continue
            if self.recovery.hidden_taps == "outputs":
                found[layer.node.name] = None
            elif layer.input.op != "placeholder":
                found[layer.input.name] = None
        return tuple(found)


class _Objective:
    """Task loss on labelled batches, distillation from the teacher on unlabeled ones (or always,
    when a distillation loss is configured and labels are present)."""

    def __init__(
        self,
        teacher: Tapped,
        taps: int,
        distill: DistillLoss | None,
        data: Calibration,
        token_mask: int | None = None,
    ) -> None:
        self.teacher, self.taps, self.distill, self.data = teacher, taps, distill, data
        self.token_mask = token_mask

    def __call__(self, model: nn.Module, inputs: tuple[Any, ...], labels: Any) -> torch.Tensor:
        flat = pytree.tree_leaves(tuple(inputs))
        result = list(model(*flat))
        outputs, taps = result[: len(result) - self.taps], result[len(result) - self.taps :]
        loss = torch.zeros(())
        if labels is not None:
            loss = loss + self.data.loss_of(outputs if len(outputs) > 1 else outputs[0], labels)
        elif self.distill is None:
            raise RecipeError(
                "recovery got an unlabeled batch (labels=None) but distill=None: label the batches or "
                'set Recovery(distill="output" or "hidden") to learn from the dense model'
            )
        if self.distill is not None:
            with torch.no_grad():
                teacher_outputs, teacher_taps = self.teacher(flat)
            mask = None if self.token_mask is None else flat[self.token_mask]
            loss = loss + self.distill(outputs, teacher_outputs, taps, teacher_taps, mask)
        return loss


class _HeldSparsity(LoopHook):
    """Re-applies the sparsity earlier passes recorded (e.g. pruned connections) after every step."""

    name = "held_sparsity"

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm

    def after_step(self, step: int) -> None:
        apply_masks(self.gm, self.gm)


def _check_token_mask(index: int | None, example_inputs: Sequence[Any]) -> None:
    if index is None:
        return
    flat = pytree.tree_leaves(tuple(example_inputs))
    if not 0 <= index < len(flat) or not isinstance(flat[index], torch.Tensor) or flat[index].dim() != 2:
        raise RecipeError(
            f"token_mask={index} must be the position of a [batch, sequence] tensor among the "
            f"{len(flat)} flattened example inputs (a tokenizer's attention mask)"
        )


def _comparable_taps(
    student: torch.fx.GraphModule, teacher: torch.fx.GraphModule, taps: tuple[str, ...], data: Calibration
) -> tuple[str, ...]:
    """The hidden taps the teacher has too, in the same coordinates and shapes.

    For a teacher that is not the graph the student started from (the unpruned model, after
    channel pruning): taps it lacks or shapes it differs in are dropped, and all of them when a
    reordering changed the student's coordinates (the outputs are never reordered, so output
    distillation always applies).
    """
    if not taps:
        return taps
    records = get_metadata(student).params.values()
    if any(isinstance(r, Permutation) for rs in records for r in rs):
        log.info("RecoverSparsityPass: reordered coordinates, distilling the outputs only")
        return ()
    names = {n.name for n in teacher.graph.nodes}
    present = tuple(t for t in taps if t in names)
    inputs = next(iter(data))[0]
    with torch.no_grad():
        ours = Tapped(student, present, outputs=False)(inputs)[1]
        theirs = Tapped(teacher, present, outputs=False)(inputs)[1]
    kept = tuple(t for t, a, b in zip(present, ours, theirs, strict=True) if a.shape == b.shape)
    log.info("RecoverSparsityPass: %d of %d hidden taps match the unpruned teacher", len(kept), len(taps))
    return kept


def token_mask_position(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> int | None:
    """Which flattened input is a tokenizer's attention mask, or None.

    An input whose placeholder is named ``attention_mask`` (as ``BertModel.forward`` and most
    transformers models name it), else the one 2-D integer/bool input holding only 0 and 1, with a
    1 in every row and the shape of another 2-D integer input (the token ids); ``token_type_ids``
    (0/1 too, but not a mask) is never taken.
    """
    flat = pytree.tree_leaves(tuple(example_inputs))
    names = [node.name for node in gm.graph.nodes if node.op == "placeholder"]
    masks = [i for i, value in enumerate(flat) if _mask_like(value)]
    named = [i for i in masks if i < len(names) and "attention_mask" in names[i]]
    if named:
        return named[0]
    unnamed = [i for i in masks if not (i < len(names) and "type" in names[i])]
    ids = [v for v in flat if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point()]
    shaped = [i for i in unnamed if any(v is not flat[i] and v.shape == flat[i].shape for v in ids)]
    return shaped[0] if len(shaped) == 1 else None


def _mask_like(value: object) -> bool:
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.is_floating_point():
        return False
    as_int = value.to(torch.int64)
    return bool(((as_int == 0) | (as_int == 1)).all()) and bool((as_int == 1).any(dim=1).all())
