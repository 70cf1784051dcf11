"""Discrimination-aware channel pruning (DCP; Zhuang et al., NeurIPS 2018) on an fx GraphModule.

DCP chooses, for each prunable layer, which *input channels* to keep, greedily, using the
gradient of a joint loss ``L = L_M + λ·L_S``: ``L_M`` the reconstruction error of the layer's
output against the baseline model's (Eq. 3, ``1/(2Q)·Σ‖O^b − O‖²``) and ``L_S`` the cross-entropy
of an auxiliary head (BN → ReLU → global average pool → linear, Eq. 4–5) at the end of the
layer's stage (the model's own loss for the last stage). The steps (``docs/methods.md``):

1. P auxiliary heads at evenly spaced conv layers ("pivots"); stage p is the layers up to pivot p.
2. Auxiliary fine-tune. ``aux="code"`` (released code, "2019.05"): every head and the network
   trained jointly once, head k's loss weighted by The Shallow End's
   ``γ_k = max(0.01, (depth_k / depth_final)²)`` (depth counted in graph nodes here; the code
   counts residual blocks). ``aux="paper"`` (Alg. 1): before stage p, the
   network and head p trained with alternating steps on ``L_S^p`` and the final loss ``L_f``.
3. For each layer of the stage, Alg. 2: start from no channel (weights 0); repeat: accumulate
   ``G = ∂L/∂W`` over the selection data, add the unselected unit with the largest
   ``Σ_out ‖G[out, j]‖_F`` (``importance="code"``) or ``‖G[:, j]‖_F`` (``"paper"``), warm-start
   its weights from the fine-tuned model, and take one pass of masked SGD on the selected
   weights (lr 0.01, Nesterov, momentum 0.9, wd 1e-4); stop when ``#unselected ≤ ⌊c·rate⌋``
   (fixed η = fraction *pruned*, as the code reads it) or, with ``epsilon``, when
   ``|L_{t−1} − L_t| / L_0 ≤ ε`` (DCP-Adapt).

The result is one score per unit for each group DCP ran on, so the pruning pass consumes it like
any criterion: selected units score ``c − t`` (t = the step that selected them, so ≥ 1: the
selection order); unselected units score in ``[0, 0.5]``, their last gradient norm scaled, so a
pass that keeps more than DCP selected keeps the most promising of the rest. With ``epsilon``,
"score ≥ 1" is DCP-Adapt's own keep set. This module defines the channel criterion "dcp"
(:data:`DCP`, scored by :func:`dcp_criterion`).

Which groups: a group whose units reach exactly one consumer, the input channels (dim 1) of a
``conv2d`` (groups = 1) or ``linear`` weight used by one node. The other prunable groups (e.g. a
residual stream feeding many convs, which the released code never prunes either) are scored by
the ``fallback`` criterion (L1 by default; ``"error"`` refuses).

Selection data: the calibration batches are read once into a list (``max_batches`` of them) and
reused in that order for every pass; keep it to what fits in memory (the paper selects on 10k
ImageNet images).

Deviations from the paper and the code (each also noted where it happens):
- Only scores leave DCP: the auxiliary fine-tune and the per-layer reconstructed weights do not
  reach the pruned model (``DCPResult.weights`` holds the latter for a pass that wants them). The
  input model is never modified; DCP works on a copy.
- Heads sit on a conv node's output in the flat ATen graph (the code puts them after residual
  blocks); pivots are evenly spaced over conv nodes, not the code's residual-block formula.
- Batch norms run as captured (eval mode, running statistics), also during the fine-tunes.
- ``aux="code"`` takes one step on the weighted sum of losses per batch (the code steps once
  per loss, with per-segment learning rates); epochs and lr are options (the code: 100 epochs).
- ``L_t`` for the ε rule is the mean loss over the SGD pass that followed selection t (the loss
  as the pass saw it, not a second evaluation); ``L_0`` is the loss with no channel selected.
- The baseline ``O^b`` is the model after the auxiliary fine-tune for ``aux="code"`` (the code
  selects against its aux-fine-tuned checkpoint) and the input model for ``aux="paper"``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from tilefx.errors import RecipeError
from tilefx.options import option, options

from ..analysis.channel_groups import ChannelGroup
from ..graph_utils import attr_tensor, get_attr_users, param_node
from ..training.calibration import Calibration, as_calibration, first_tensor
from ..training.loop import LoopHook, LoopOptions, train
from ..training.taps import Tapped
from .base import ChannelScores, Criterion, CriterionOptions, ScoringInputs, magnitude_scores

__all__ = [
    "DCP",
    "AuxHead",
    "DCPOptions",
    "DCPResult",
    "SGDOptions",
    "dcp_criterion",
    "dcp_scores",
    "selectable_layers",
]

log = logging.getLogger(__name__)
aten = torch.ops.aten


@options
class SGDOptions:
    """SGD with Nesterov momentum for DCP's fine-tunes; the defaults are DCP's (lr 0.01, momentum
    0.9, wd 1e-4). epochs: passes over the selection batches, in their order, at a constant lr."""

    lr: float = option(default=0.01, gt=0)
    momentum: float = option(default=0.9, ge=0, lt=1)
    weight_decay: float = option(default=1e-4, ge=0)
    nesterov: bool = True
    epochs: int = option(default=1, ge=0)

    def loop_options(self, batches: int, epochs: int | None = None) -> LoopOptions:
        """These options on the training loop: ``epochs`` (default ``self.epochs``) passes over
        ``batches`` batches in order, one optimiser step per batch, run locally on every rank."""
        return LoopOptions(
            steps=(self.epochs if epochs is None else epochs) * batches,
            lr=self.lr,
            optimizer="sgd",
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            nesterov=self.nesterov,
            decay="constant",
            shuffle=False,
            progress=False,
            distributed=False,
        )


@options
class DCPOptions(CriterionOptions):
    """DCP's knobs; defaults follow the released code where the paper and code differ.

    rate: η, the fraction of each layer's input units to prune (fixed-rate stopping); ignored
    when ``epsilon`` is set (DCP-Adapt). num_losses: P auxiliary heads. lam: λ.
    aux_epochs / aux_lr: the auxiliary fine-tune budget (0 epochs: heads untrained, L_S noise).
    finetune_network: False trains only the heads in step 2 (a cheaper deviation).
    """

    rate: float = option(default=0.5, ge=0, lt=1)
    epsilon: float | None = option(default=None, gt=0)
    num_losses: int = option(default=2, ge=0)
    lam: float = option(default=1.0, ge=0)
    aux: Literal["code", "paper"] = "code"
    aux_epochs: int = option(default=2, ge=0)
    aux_lr: float = option(default=0.01, gt=0)
    finetune_network: bool = True
    importance: Literal["code", "paper"] = "code"
    solver: SGDOptions = field(default_factory=SGDOptions)
    fallback: Literal["l1", "error"] = "l1"
    seed: int = option(default=0, ge=0)


@dataclass(frozen=True, eq=False)
class DCPResult:
    """scores: group id → per-unit score. order: group id → units in selection order.
    losses: group id → ``L_0, L_1, …`` per selection step. weights: consumer weight target →
    the reconstructed weight (unselected units zero). fallback: groups scored by the fallback."""

    scores: dict[int, torch.Tensor]
    order: dict[int, tuple[int, ...]]
    losses: dict[int, tuple[float, ...]]
    weights: dict[str, torch.Tensor]
    fallback: tuple[int, ...]


@dataclass(frozen=True)
class _Layer:
    group: ChannelGroup
    node: str  # the consuming conv2d / linear
    target: str  # its weight
    dim: int
    positions: torch.Tensor  # long [units, k]
    index: int  # topological position of ``node``


class AuxHead(nn.Module):
    """DCP's auxiliary classifier (Eq. 4–5): BN → ReLU → global average pool → linear."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(x)).mean(dim=(2, 3)))


def selectable_layers(
    gm: torch.fx.GraphModule, groups: Sequence[ChannelGroup]
) -> tuple[list[_Layer], list[ChannelGroup]]:
    """Split prunable groups into those DCP selects on (one conv2d/linear consumer) and the rest."""
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    layers, rest = [], []
    for group in groups:
        layer = _layer_of(gm, group, order)
        if layer is None:
            rest.append(group)
        else:
            layers.append(layer)
    layers.sort(key=lambda layer: layer.index)
    return layers, rest


def _layer_of(gm: torch.fx.GraphModule, group: ChannelGroup, order: dict[str, int]) -> _Layer | None:
    inputs = group.slices_by_role("in")
    if group.frozen or len(inputs) != 1 or inputs[0].dim != 1:
        return None
    piece = inputs[0]
    users = get_attr_users(gm, piece.target)
    if len(users) != 1 or not _is_dense_layer(users[0]) or param_node(users[0].args[1]) != piece.target:
        return None
    positions = torch.as_tensor(piece.positions, dtype=torch.long)
    return _Layer(group, users[0].name, piece.target, piece.dim, positions, order[users[0].name])


def _is_dense_layer(node: torch.fx.Node) -> bool:
    if node.target == aten.linear.default:
        return True
    if node.target != aten.conv2d.default:
        return False
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return bool(groups == 1)


def dcp_scores(
    gm: torch.fx.GraphModule, groups: Sequence[ChannelGroup], data: Calibration, options: DCPOptions
) -> DCPResult:
    """Run DCP on a private copy of ``gm``; see the module docstring. ``gm`` is not modified."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        return _DCP(gm, data, options).run(groups)


class _DCP:
    """One DCP run: the working copy, the heads, and the per-layer greedy selection."""

    def __init__(self, gm: torch.fx.GraphModule, data: Calibration, options: DCPOptions) -> None:
        self.original = gm
        self.work = copy.deepcopy(gm)
        for p in self.work.parameters():
            p.requires_grad_(True)
        # One fixed list of batches: the baseline outputs are cached per batch, so every pass must
        # see the same batches in the same order (a shuffling DataLoader would not).
        batches = list(data)
        self.data = Calibration(batches, loss=data.loss)
        self.batch_count = len(batches)
        if not batches:
            raise RecipeError("DCP: the calibration data yielded no batches")
        self.options = options
        self.masks: dict[str, torch.Tensor] = {}  # pruned so far: weight target → element mask
        self.tuned_stage = -1  # paper variant: the stage whose fine-tune already ran

    def run(self, groups: Sequence[ChannelGroup]) -> DCPResult:
        layers, rest = selectable_layers(self.work, groups)
        if rest and self.options.fallback == "error":
            names = ", ".join(str(g.id) for g in rest)
            raise RecipeError(f"DCP cannot select on channel groups {names} (not one conv/linear consumer)")
        self.pivots, self.heads = self._build_heads()
        self.at_pivots = Tapped(self.work, self.pivots)  # shares the work model's parameters
        baseline = self._baseline_after_aux()
        result = DCPResult({}, {}, {}, {}, tuple(g.id for g in rest))
        for layer in layers:
            if self.options.aux == "paper":
                self._stage_finetune(self._stage_of(layer))
            self._select(layer, baseline, result)
        for group in rest:
            result.scores[group.id] = magnitude_scores(self.original, group, 1)
        return result

    # ---- auxiliary heads ----------------------------------------------------------------
    def _build_heads(self) -> tuple[list[str], nn.ModuleList]:
        convs = [n.name for n in self.work.graph.nodes if n.target == aten.conv2d.default]
        count = min(self.options.num_losses, max(len(convs) - 1, 0))
        pivots = sorted({convs[round((i + 1) * len(convs) / (count + 1)) - 1] for i in range(count)})
        inputs, _ = next(iter(self.data))
        with torch.no_grad():
            outputs, taps = Tapped(self.work, pivots)(inputs)
        classes = first_tensor(outputs).shape[-1]
        heads = nn.ModuleList(AuxHead(t.shape[1], classes) for t in taps)
        log.info("DCP: %d auxiliary heads at %s, %d classes", len(pivots), pivots, classes)
        return pivots, heads

    def _stage_of(self, layer: _Layer) -> int:
        """Index of the head that closes ``layer``'s stage; len(pivots) means the final loss."""
        order = {n.name: i for i, n in enumerate(self.work.graph.nodes)}
        for p, pivot in enumerate(self.pivots):
            if order[pivot] >= layer.index:
                return p
        return len(self.pivots)

    def _head_losses(self, inputs: tuple[Any, ...], labels: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outputs, taps = self.at_pivots(inputs)
        final = self.data.loss_of(outputs if len(outputs) > 1 else outputs[0], labels)
        return final, [F.cross_entropy(head(t), labels) for head, t in zip(self.heads, taps, strict=True)]

    def _baseline_after_aux(self) -> torch.fx.GraphModule:
        if self.options.aux == "paper":
            return self.original
        self._aux_code()
        return copy.deepcopy(self.work)

    def _trainable(self) -> list[torch.Tensor]:
        network: list[torch.Tensor] = list(self.work.parameters()) if self.options.finetune_network else []
        return network + list(self.heads.parameters())

    def _aux_code(self) -> None:
        """All heads and the network jointly; head k weighted by The Shallow End's γ_k."""
        if self.options.aux_epochs == 0 or not self.pivots:
            return
        order = {n.name: i for i, n in enumerate(self.work.graph.nodes)}
        depth = len(order)
        gammas = [max(0.01, (order[p] / depth) ** 2) for p in self.pivots]

        def loss(inputs: tuple[Any, ...], labels: Any) -> torch.Tensor:
            final, aux = self._head_losses(inputs, labels)
            return final + sum((g * a for g, a in zip(gammas, aux, strict=True)), torch.zeros(()))

        self.heads.train()
        history = self._finetune(loss, [])
        log.info("DCP aux fine-tune (code variant): epoch losses %s", history)

    def _stage_finetune(self, stage: int) -> None:
        """Paper (Alg. 1, Supp. Eq. S2/S3): alternate steps on L_S^p and L_f, masks kept."""
        if self.options.aux_epochs == 0 or self.tuned_stage == stage:
            return
        self.tuned_stage = stage
        step = [0]

        def loss(inputs: tuple[Any, ...], labels: Any) -> torch.Tensor:
            final, aux = self._head_losses(inputs, labels)
            step[0] += 1
            use_aux = stage < len(aux) and step[0] % 2 == 1
            return aux[stage] if use_aux else final

        self.heads.train()
        history = self._finetune(loss, [_HoldPruned(self.work, self.masks)])
        log.info("DCP stage %d fine-tune (paper variant): epoch losses %s", stage, history)

    def _finetune(
        self, loss: Callable[[tuple[Any, ...], Any], torch.Tensor], hooks: list[LoopHook]
    ) -> list[float]:
        """``aux_epochs`` passes of SGD (lr ``aux_lr``, the solver's momentum and decay) over the
        selection batches on the training loop; returns each epoch's mean loss."""
        options = SGDOptions(
            lr=self.options.aux_lr,
            momentum=self.options.solver.momentum,
            weight_decay=self.options.solver.weight_decay,
            epochs=self.options.aux_epochs,
        ).loop_options(self.batch_count)
        # The loop hands the objective the heads (the module it puts in train mode); the loss
        # reads them and the tapped network itself.
        result = train(
            self.heads,
            lambda _, inputs, labels: loss(inputs, labels),
            self.data,
            options,
            hooks,
            self._trainable(),
        )
        n = self.batch_count
        return [sum(result.losses[i : i + n]) / n for i in range(0, len(result.losses), n)]

    # ---- greedy channel selection (Alg. 2) ---------------------------------------------
    def _select(self, layer: _Layer, baseline: torch.fx.GraphModule, result: DCPResult) -> None:
        stage = self._stage_of(layer)
        taps = [layer.node] + ([self.pivots[stage]] if stage < len(self.pivots) else [])
        # The layer's input is fixed while its channels are chosen: compute it once, run the rest.
        source = self._input_of(layer)
        tapped = Tapped(self.work, taps, cut=[source])
        prefix = self._outputs(self.work, source)
        targets = self._outputs(baseline, layer.node)
        self.heads.eval()
        problem = _Problem(self, layer, tapped, targets, prefix, stage)
        order, losses, final_scores, weight = problem.solve()
        units = layer.positions.shape[0]
        scores = torch.zeros(units, dtype=torch.float64)
        rest = final_scores.clone()
        rest[list(order)] = 0.0
        scores += 0.5 * rest / rest.max().clamp_min(1e-30)
        for t, unit in enumerate(order):
            scores[unit] = float(units - t)
        result.scores[layer.group.id] = scores
        result.order[layer.group.id] = tuple(order)
        result.losses[layer.group.id] = tuple(losses)
        result.weights[layer.target] = weight.detach().clone()
        mask = _element_mask(weight, layer, order)
        with torch.no_grad():
            attr_tensor(self.work, layer.target).copy_(weight * mask)
        self.masks[layer.target] = mask
        log.info("DCP: %s keeps %d of %d units after %d steps", layer.node, len(order), units, len(order))

    def _input_of(self, layer: _Layer) -> str:
        node = next(n for n in self.work.graph.nodes if n.name == layer.node)
        source = node.args[0]
        if not isinstance(source, torch.fx.Node):
            raise RecipeError(f"DCP: the input of {layer.node} is not a graph value")
        return source.name

    def _outputs(self, gm: torch.fx.GraphModule, node: str) -> list[torch.Tensor]:
        """``node``'s value on every selection batch (no gradient)."""
        tapped = Tapped(gm, [node])
        with torch.no_grad():
            return [tapped(inputs)[1][0].detach() for inputs, _ in self.data]


@dataclass
class _Problem:
    """Alg. 2 for one layer: the joint loss as a function of the layer's weight, and the loop."""

    dcp: _DCP
    layer: _Layer
    tapped: Tapped
    targets: list[torch.Tensor]  # baseline output of the layer, per batch
    prefix: list[torch.Tensor]  # the layer's input in the pruned-so-far model, per batch
    stage: int
    _last_mean: float = 0.0

    def loss(self, weight: torch.Tensor, inputs: tuple[Any, ...], labels: Any, batch: int) -> torch.Tensor:
        outputs, taps = self.tapped(inputs, {self.layer.target: weight}, given=[self.prefix[batch]])
        reconstruction = 0.5 * F.mse_loss(taps[0], self.targets[batch])  # 1/(2Q)·Σ‖O^b − O‖²
        if self.stage < len(self.dcp.heads):
            discrimination = F.cross_entropy(self.dcp.heads[self.stage](taps[1]), labels)
        else:
            discrimination = self.dcp.data.loss_of(outputs if len(outputs) > 1 else outputs[0], labels)
        return reconstruction + self.dcp.options.lam * discrimination

    def gradient(self, weight: torch.Tensor) -> tuple[torch.Tensor, float]:
        total, value, batches = torch.zeros_like(weight), 0.0, 0
        for batch, (inputs, labels) in enumerate(self.dcp.data):
            w = weight.detach().requires_grad_()
            loss = self.loss(w, inputs, labels, batch)
            (grad,) = torch.autograd.grad(loss, [w])
            total, value, batches = total + grad, value + float(loss.detach()), batches + 1
        return total, value / max(batches, 1)

    def unit_scores(self, grad: torch.Tensor) -> torch.Tensor:
        rows = grad.movedim(self.layer.dim, 0)[self.layer.positions]  # [units, k, out, ...]
        units = rows.shape[0]
        if self.dcp.options.importance == "paper":
            return rows.reshape(units, -1).norm(dim=1).double()
        per_out = rows.movedim(2, 1).reshape(units, rows.shape[2], -1).norm(dim=2)
        return per_out.sum(dim=1).double()

    def keep_count(self, units: int) -> int:
        """Fixed rate: stop once #unselected ≤ ⌊c·η⌋ (the code), i.e. keep c − ⌊c·η⌋ ≥ 1."""
        return max(1, units - math.floor(units * self.dcp.options.rate))

    def solve(self) -> tuple[list[int], list[float], torch.Tensor, torch.Tensor]:
        original = attr_tensor(self.dcp.work, self.layer.target).detach().clone()
        weight = torch.zeros_like(original)
        units = self.layer.positions.shape[0]
        epsilon = self.dcp.options.epsilon
        limit = units if epsilon is not None else self.keep_count(units)
        order: list[int] = []
        grad, loss0 = self.gradient(weight)
        losses = [loss0]
        while len(order) < limit:
            scores = self.unit_scores(grad)
            if order:
                scores[order] = -math.inf
            unit = int(torch.argmax(scores))  # ties: the lowest index, deterministic
            order.append(unit)
            index = self.layer.positions[unit]
            weight.index_copy_(self.layer.dim, index, original.index_select(self.layer.dim, index))
            mask = _element_mask(weight, self.layer, order)
            weight = self._solve_subproblem(weight, mask)
            losses.append(self._last_mean)
            if epsilon is not None and abs(losses[-2] - losses[-1]) / max(abs(losses[0]), 1e-30) <= epsilon:
                break
            grad, _ = self.gradient(weight)
        return order, losses, self.unit_scores(grad), weight

    def _solve_subproblem(self, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 8–9: one pass of SGD on the selected weights (gradient masked to them)."""
        holder = _Weight(weight)
        batches = list(self.dcp.data)
        # The loop's batches carry each batch's index: the targets and prefixes are cached per batch.
        indexed = Calibration([((index,), labels) for index, (_, labels) in enumerate(batches)])

        def objective(model: nn.Module, inputs: tuple[Any, ...], labels: Any) -> torch.Tensor:
            (index,) = inputs
            return self.loss(holder.weight, batches[index][0], labels, index)

        options = self.dcp.options.solver.loop_options(len(batches), epochs=1)
        result = train(holder, objective, indexed, options, [_MaskedUpdate(holder.weight, mask)])
        self._last_mean = sum(result.losses) / max(len(result.losses), 1)
        return holder.weight.detach()


class _Weight(nn.Module):
    """One free weight tensor as a module, for the loop to train."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())


class _MaskedUpdate(LoopHook):
    """Only the selected weights train: the gradient is masked, and after the step the weight too
    (weight decay and momentum must not revive pruned units)."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor) -> None:
        self.weight, self.mask = weight, mask

    def after_backward(self, step: int) -> None:
        if self.weight.grad is not None:
            self.weight.grad.mul_(self.mask)

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            self.weight.mul_(self.mask)


class _HoldPruned(LoopHook):
    """Channels DCP already pruned stay zero through a fine-tune: masks re-applied after each step."""

    def __init__(self, gm: torch.fx.GraphModule, masks: dict[str, torch.Tensor]) -> None:
        self.gm, self.masks = gm, masks

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            for target, mask in self.masks.items():
                attr_tensor(self.gm, target).mul_(mask)


def _element_mask(weight: torch.Tensor, layer: _Layer, units: Sequence[int]) -> torch.Tensor:
    mask = torch.zeros(weight.shape[layer.dim], dtype=weight.dtype)
    if units:
        mask[layer.positions[list(units)].reshape(-1)] = 1.0
    shape = [1] * weight.dim()
    shape[layer.dim] = -1
    return mask.reshape(shape).expand_as(weight).contiguous()


def dcp_criterion(
    gm: torch.fx.GraphModule, groups: tuple[ChannelGroup, ...], inputs: ScoringInputs
) -> ChannelScores:
    """The channel criterion "dcp": :func:`dcp_scores` with ``inputs.options`` (DCPOptions()
    if None). With ``epsilon`` (DCP-Adapt) the units DCP selected (score ≥ 1) are the keep set."""
    data = as_calibration(inputs.calibration, 'criterion "dcp"')
    options = inputs.options if inputs.options is not None else DCPOptions()
    if not isinstance(options, DCPOptions):
        raise RecipeError(f'criterion "dcp" takes DCPOptions, got {type(options).__name__}')
    result = dcp_scores(gm, groups, data, options)
    keep = {}
    if options.epsilon is not None:
        keep = {gid: int((s >= 1).sum()) for gid, s in result.scores.items() if gid not in result.fallback}
    return ChannelScores("dcp", result.scores, keep)


DCP = Criterion("dcp", dcp_criterion, options_type=DCPOptions, needs_calibration=True)
