"""VR-PGE structure parameters (Zhou et al., NeurIPS 2021): learn which channels to keep while training.

Every unit u of every prunable channel group gets a score ``s_u ∈ [0, 1]``, the probability that
it is on: a mask ``m ~ Bernoulli(s)`` multiplies all of the unit's parameter slices (the
:mod:`~tilefx.passes.training.structure_masks` wrappers). One step of the search, on the one
training loop (:func:`~tilefx.passes.training.loop.train`):

1. draw ``K`` (default 2) masks; run one forward pass with each, losses ``L_1 … L_K``;
   backpropagate their mean for the weights (a masked unit's weights get no gradient);
2. the variance-reduced policy-gradient estimate for the scores,
   ``g = 1/(K−1) · Σ_k (L_k − L̄) · ψ(m_k, s)`` with ``L̄`` the mean loss: no backward pass;
   ``estimator="score"`` uses the score function ``ψ = (m − s) / (s(1 − s))``, an unbiased
   estimate of ``∇_s E[L]``; ``estimator="code"`` (the authors' released code, default) uses
   ``ψ = (m − s) / sqrt(s(1 − s))``, unbiased for ``sqrt(s(1 − s)) ⊙ ∇_s E[L]`` (a per-unit
   rescaling that damps units already near 0 or 1);
3. an Adam step on the scores (gradient norm clipped at ``score_clip``), then the projection onto
   the budget ``{0 ≤ s ≤ 1, Σ_u c_u s_u ≤ k}``: ``s ← clamp(s − v·c, 0, 1)`` with ``v ≥ 0``
   found by bisection so that the budget holds with equality (``v = 0`` when already inside).
   ``c_u = 1`` counts channels (``budget="channels"``, the paper); ``budget="flops"`` weighs
   each unit by the multiply-accumulates its slices cost at full width (linearised: a conv
   between two pruned groups costs ``c_in·c_out``, so the realised saving is larger).

Afterwards the mask is fixed — ``final="sample"`` draws ``final_samples`` masks and keeps the one
with the lowest training loss (the paper keeps the best of 10 by training accuracy), ``"top"``
keeps the highest scores that fit the budget — every group keeps at least one unit, and the
weights are fine-tuned with the mask fixed. :class:`~tilefx.passes.train_structure_params.TrainStructureParamsPass`
runs all of this on a graph; the criterion "vrpge" registered here reads the result.

Deviations: the scores start at ``score_init`` projected onto the budget, by default at the kept
fraction itself, so the budget binds from the first step (the code starts at 0.5 whatever the
budget, and a budget above half is then slack until the loss pushes the scores up); the bisection runs to float64 precision (the code: 20 steps, tolerance
1e-3), so the budget is met exactly; weights train with the loop's optimiser and schedule.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.fx
import torch.nn as nn

from tilefx.errors import RecipeError
from tilefx.options import option, options

from ..analysis.channel_groups import ChannelGroup
from ..graph_utils import attr_tensor, get_attr_users
from ..training.calibration import Calibration
from ..training.loop import LoopHook, LoopOptions, Optimizer, broadcast_from_rank0, train
from ..training.structure_masks import WrappedGroup
from .base import ChannelScores, Criterion, CriterionOptions, ScoringInputs, unit_rows

__all__ = [
    "VRPGE",
    "Budget",
    "Estimator",
    "StructureSearch",
    "VRPGEOptions",
    "final_mask",
    "project_scores",
    "search_structure",
    "unit_costs",
    "vrpge_criterion",
    "vrpge_gradient",
]

log = logging.getLogger(__name__)
aten = torch.ops.aten

Estimator = Literal["code", "score"]
Budget = Literal["channels", "flops"]

_EPS = 1e-6  # ψ divides by s(1 − s): scores are clamped this far inside [0, 1] there


@options
class VRPGEOptions(CriterionOptions):
    """VR-PGE's knobs. The budget keeps ``1 − ChannelPruning.ratio`` of the channels (or FLOPs).

    steps / lr / optimizer: the search (weights and scores together) on the one loop, cosine
    decay. finetune_steps / finetune_lr: the masked fine-tune after the mask is fixed.
    score_lr: Adam on the scores. score_init: the scores' start (None: the kept fraction). samples: K masks (forward passes) per step, at least 2.
    final_batches: training batches the "sample" choice scores each candidate mask on.
    """

    steps: int = option(default=300, ge=0)
    lr: float = option(default=0.01, gt=0)
    optimizer: Optimizer = "sgd"
    finetune_steps: int = option(default=100, ge=0)
    finetune_lr: float = option(default=0.001, gt=0)
    score_lr: float = option(default=0.05, gt=0)
    score_init: float | None = option(default=None, gt=0, le=1)
    score_clip: float | None = option(default=3.0, gt=0)
    samples: int = option(default=2, ge=2)  # the baseline needs two
    estimator: Estimator = "code"
    budget: Budget = "channels"
    final: Literal["sample", "top"] = "sample"
    final_samples: int = option(default=10, ge=1)
    final_batches: int = option(default=4, ge=1)
    seed: int = option(default=0, ge=0)


def vrpge_gradient(
    losses: torch.Tensor, masks: torch.Tensor, scores: torch.Tensor, estimator: Estimator = "code"
) -> torch.Tensor:
    """``1/(K−1) Σ_k (L_k − L̄) ψ(m_k, s)`` for losses ``[..., K]``, masks ``[..., K, n]``, scores ``[n]``.

    Leading dimensions are independent estimates (a test averages many at once).
    """
    samples = losses.shape[-1] if losses.dim() else 0
    if samples < 2 or masks.shape != (*losses.shape, scores.shape[-1]):
        raise RecipeError(
            f"vrpge_gradient: losses [..., K>=2], masks [..., K, n], scores [n]; got losses "
            f"{tuple(losses.shape)}, masks {tuple(masks.shape)}, scores {tuple(scores.shape)}"
        )
    s = scores.clamp(_EPS, 1 - _EPS)
    spread = s * (1 - s)
    psi = (masks - s) / (spread if estimator == "score" else spread.sqrt())
    centred = (losses - losses.mean(dim=-1, keepdim=True)).to(psi.dtype)
    return (centred[..., None] * psi).sum(dim=-2) / (samples - 1)


def project_scores(scores: torch.Tensor, costs: torch.Tensor, budget: float) -> torch.Tensor:
    """The point of ``{0 ≤ s ≤ 1, costs·s ≤ budget}`` nearest ``scores`` (Euclidean), by bisection.

    It is ``clamp(s − v·costs, 0, 1)`` for the ``v ≥ 0`` where the budget holds with equality
    (``v = 0`` if ``clamp(s, 0, 1)`` is inside already). Bisection runs to float64 precision.
    """
    if bool((costs <= 0).any()) or budget < 0:
        raise RecipeError("project_scores: costs must be positive and the budget non-negative")
    s, c = scores.double(), costs.double()
    inside = s.clamp(0, 1)
    if float((c * inside).sum()) <= budget:
        return inside.to(scores.dtype)

    def used(v: float) -> float:
        return float((c * (s - v * c).clamp(0, 1)).sum())

    low, high = 0.0, float((s.max() / c.min()).clamp_min(0)) + 1.0  # used(high) = 0 ≤ budget
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if used(middle) > budget:
            low = middle
        else:
            high = middle
    return (s - high * c).clamp(0, 1).to(scores.dtype)


def unit_costs(
    gm: torch.fx.GraphModule, group: ChannelGroup, budget: Budget, shapes: Mapping[str, tuple[int, ...]]
) -> torch.Tensor:
    """Each unit's weight in the budget: 1 (channels) or its multiply-accumulates at full width.

    A unit's MACs: over the group's slices of conv2d/linear weights, the slice's elements per unit
    times the output positions per sample (H·W of a conv, the tokens of a linear). A group that
    touches no such weight costs 1 per unit (a norm-only group).
    """
    ones = torch.ones(group.units, dtype=torch.float64)
    if budget == "channels":
        return ones
    cost = torch.zeros(group.units, dtype=torch.float64)
    for piece in group.slices:
        weight = attr_tensor(gm, piece.target)
        per_unit = weight.numel() / weight.shape[piece.dim] * piece.positions.shape[1]
        for user in get_attr_users(gm, piece.target):
            if user.target not in (aten.conv2d.default, aten.linear.default) or len(user.args) < 2:
                continue
            if getattr(user.args[1], "target", None) != piece.target or user.name not in shapes:
                continue
            out = shapes[user.name]
            channels = out[1] if user.target == aten.conv2d.default else out[-1]
            cost += per_unit * math.prod(out) / (out[0] * channels)
    return torch.where(cost > 0, cost, ones)


class StructureSearch(LoopHook):
    """The VR-PGE search as a loop hook plus the objective that draws the masks.

    ``objective`` runs ``samples`` forward passes, each with freshly drawn masks, and returns
    their mean loss (the loop backpropagates it for the weights); ``after_step`` turns the
    recorded losses and masks into the score gradient, steps Adam and projects onto the budget.
    Under torch.distributed the ranks share rank 0's masks and average their score estimates,
    so the scores stay identical everywhere.
    """

    name = "vrpge"

    def __init__(
        self,
        wrapped: Sequence[WrappedGroup],
        costs: Sequence[torch.Tensor],
        keep: float,
        options: VRPGEOptions,
        loss: Calibration,
    ) -> None:
        self.wrapped, self.options, self.loss = list(wrapped), options, loss
        self.sizes = [w.group.units for w in wrapped]
        self.costs = torch.cat(list(costs)).double()
        self.budget = keep * float(self.costs.sum())
        init = keep if options.score_init is None else options.score_init
        start = torch.full((sum(self.sizes),), init, dtype=torch.float64)
        self.scores = nn.Parameter(project_scores(start, self.costs, self.budget))
        self.optimizer = torch.optim.Adam([self.scores], lr=options.score_lr)
        self._estimates: list[torch.Tensor] = []

    # ---- masks --------------------------------------------------------------------------
    def set_masks(self, flat: torch.Tensor) -> None:
        for w, mask in zip(self.wrapped, flat.split(self.sizes), strict=True):
            w.mask.set_mask(mask)

    def draw(self) -> torch.Tensor:
        """A mask ~ Bernoulli(s); under torch.distributed every rank takes rank 0's."""
        mask = torch.bernoulli(self.scores.detach()).float()
        broadcast_from_rank0(mask)  # the loop seeds every rank alike; this makes it a guarantee
        return mask

    # ---- the loop's pieces -----------------------------------------------------------------
    def objective(self, model: nn.Module, inputs: tuple[Any, ...], labels: Any) -> torch.Tensor:
        losses, masks = [], []
        for _ in range(self.options.samples):
            mask = self.draw()
            self.set_masks(mask)
            losses.append(self.loss.loss_of(model(*inputs), labels))
            masks.append(mask)
        taken = torch.stack([loss.detach().double() for loss in losses])
        self._estimates.append(
            vrpge_gradient(taken, torch.stack(masks).double(), self.scores.detach(), self.options.estimator)
        )
        return torch.stack(losses).mean()

    def after_backward(self, step: int) -> None:
        if not self._estimates:
            return
        estimate = torch.stack(self._estimates).mean(dim=0)
        self._estimates.clear()
        if dist.is_available() and dist.is_initialized():  # ranks saw different batches: average
            dist.all_reduce(estimate)
            estimate /= dist.get_world_size()
        self.scores.grad = estimate
        if self.options.score_clip is not None:
            nn.utils.clip_grad_norm_([self.scores], self.options.score_clip)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]  # the loop steps it with the estimate set in after_backward

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            self.scores.copy_(project_scores(self.scores, self.costs, self.budget))

    def progress(self) -> dict[str, float]:
        s = self.scores.detach()
        return {
            "kept": float((self.costs * s).sum()) / float(self.costs.sum()),
            "decided": float(((s < 0.05) | (s > 0.95)).double().mean()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            self.scores.copy_(state["scores"])
        self.optimizer.load_state_dict(state["optimizer"])

    def group_scores(self) -> list[torch.Tensor]:
        return list(self.scores.detach().split(self.sizes))


def final_mask(search: StructureSearch, model: nn.Module, data: Calibration) -> torch.Tensor:
    """The fixed mask: best of ``final_samples`` draws by training loss, or the top scores."""
    options = search.options
    if options.final == "top":
        return _at_least_one(search, _top_mask(search))
    batches = [batch for _, batch in zip(range(options.final_batches), data, strict=False)]
    best, best_loss = None, math.inf
    for _ in range(options.final_samples):
        mask = _at_least_one(search, search.draw())
        search.set_masks(mask)
        with torch.no_grad():
            loss = sum(float(data.loss_of(model(*x), y)) for x, y in batches)
        if loss < best_loss:
            best, best_loss = mask, loss
    assert best is not None
    return best


def _top_mask(search: StructureSearch) -> torch.Tensor:
    """Units by descending score while their cost fits the budget."""
    mask = torch.zeros_like(search.scores, dtype=torch.float32)
    left = search.budget
    for unit in torch.argsort(search.scores.detach(), descending=True, stable=True).tolist():
        cost = float(search.costs[unit])
        if cost <= left + 1e-9:
            mask[unit], left = 1.0, left - cost
    return mask


def _at_least_one(search: StructureSearch, mask: torch.Tensor) -> torch.Tensor:
    """A group never loses every unit: its highest-scoring one stays."""
    parts = []
    for part, score in zip(mask.split(search.sizes), search.group_scores(), strict=True):
        if not bool(part.any()):
            part = part.clone()
            part[int(score.argmax())] = 1.0
        parts.append(part)
    return torch.cat(parts)


def search_structure(
    gm: torch.fx.GraphModule,
    wrapped: Sequence[WrappedGroup],
    costs: Sequence[torch.Tensor],
    keep: float,
    data: Calibration,
    options: VRPGEOptions,
) -> StructureSearch:
    """Search, fix the mask (left in the wrappers), fine-tune; ``gm``'s weights are trained in place."""
    search = StructureSearch(wrapped, costs, keep, options, data)
    weights = [p for name, p in gm.named_parameters() if not name.startswith("structure_masks")]
    for p in weights:
        p.requires_grad_(True)
    if options.steps:
        loop = LoopOptions(steps=options.steps, lr=options.lr, optimizer=options.optimizer, decay="cosine",
                           seed=options.seed, progress=False)  # fmt: skip
        result = train(gm, search.objective, data, loop, hooks=[search], params=weights)
        log.info("VR-PGE search: loss %.4g -> %.4g", result.losses[0], result.losses[-1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed + 1)
        mask = final_mask(search, gm, data)
    search.set_masks(mask)
    if options.finetune_steps:
        loop = LoopOptions(steps=options.finetune_steps, lr=options.finetune_lr, optimizer=options.optimizer,
                           decay="cosine", seed=options.seed + 2, progress=False)  # fmt: skip
        train(gm, _fixed_mask_objective(data), data, loop, params=weights)
    return search


def _fixed_mask_objective(data: Calibration) -> Any:
    def objective(model: nn.Module, inputs: tuple[Any, ...], labels: Any) -> torch.Tensor:
        return data.loss_of(model(*inputs), labels)

    return objective


def vrpge_criterion(
    gm: torch.fx.GraphModule, groups: tuple[ChannelGroup, ...], inputs: ScoringInputs
) -> ChannelScores:
    """The channel criterion "vrpge": the mask VR-PGE trained, read back from the weights.

    :class:`~tilefx.passes.train_structure_params.TrainStructureParamsPass` trains and fixes the
    mask and :class:`~tilefx.passes.materialize_masks.MaterializeChannelMasksPass` folds it into
    the weights, so a unit it dropped has every slice exactly zero. Each group keeps its live
    units (``ChannelScores.keep``); scores are the units' L1 norms over all slices. A graph with no
    dead unit (not trained by VR-PGE, or ratio 0) keeps everything, with a logged warning.
    """
    scores, keep = {}, {}
    for group in groups:
        score = torch.zeros(group.units, dtype=torch.float64)
        for piece in group.slices:
            tensor = attr_tensor(gm, piece.target)
            if tensor.is_floating_point():
                score += unit_rows(tensor.detach().double(), piece).abs().sum(dim=1)
        scores[group.id], keep[group.id] = score, max(int((score > 0).sum()), 1)
    if groups and all(keep[g.id] == g.units for g in groups):  # ratio 0 does this too: not an error
        log.warning(
            'criterion "vrpge" finds no masked channel: it reads the mask TrainStructureParamsPass '
            "trained and MaterializeChannelMasksPass folded into the weights, so nothing is pruned "
            'unless those passes ran first (tilefx.optimize runs them for ChannelPruning(criterion="vrpge"))'
        )
    return ChannelScores("vrpge", scores, keep)


VRPGE = Criterion(
    "vrpge", vrpge_criterion, options_type=VRPGEOptions, needs_calibration=True, trains_structure=True
)
