"""Self-supervised GAN compression (Yu & Pool, NeurIPS 2020) on the one training loop.

A sparse copy ``G_C`` of a trained generator learns to behave like the dense one ``G_O`` (a
frozen teacher) in the eyes of the original discriminator ``D``, which keeps training and is never
pruned. Per batch of real samples ``x`` and latents ``z`` (non-saturating GAN losses, ``σ`` the
sigmoid, ``D`` returning logits)::

    L_G(G)  = −log σ(D(G(z)))                              the generator's adversarial loss
    L_D(G)  = −log σ(D(x)) − log(1 − σ(D(G(z))))           the discriminator's loss against G
    L_GC    = |L_G(G_C) − L_G(G_O)| / |L_G(G_O)|           generative consistency
    L_DC    = |L_D(G_C) − L_D(G_O)| / |L_D(G_O)|           discriminative consistency
    G_C minimises  L_GC + λ·L_DC  (λ = 0.5)
    D   minimises  L_D(G_C)       (our reading: "D_O … can adapt", to the compressed generator)

Batch means are taken before the differences (the paper compares loss *values*). ``G_O``'s terms
are constants (no gradient). With ``G_C = G_O`` both consistency terms are exactly zero.

The min-max runs as *one* objective on the loop (``loop.train``): the module handed to it holds
``G_C`` and ``D`` (:class:`GANPlayers`), and each player's term is built so that it can only reach
that player's parameters — the generator's term reads ``D`` through ``torch.func.functional_call``
with *detached* parameters, the discriminator's term reads ``G_C``'s samples detached. The sum of
the two terms then has exactly ``∇_{G_C} L_G-side`` on ``G_C`` and ``∇_D L_D`` on ``D``, from one
backward pass and one optimiser (why not gradient reversal: reversal gives ``D`` minus the
generator's objective, which here is a consistency term, not ``D``'s own loss).

Sparsity is a :class:`~tilefx.passes.training.gradual_pruning.GradualBlockPruning` hook on the
same loop: the cubic schedule of Zhu & Gupta from 5% to the target by half-way
(``schedule="gradual"``) or the target from step 0 (``"oneshot"``); masks re-selected by
magnitude, re-applied after every step. ``granularity="element"`` masks single weights (block
1×1, magnitude); ``"filter"`` masks whole output channels (a row of the matrix view, by L1), and
:class:`_FilterBiases` zeroes their biases too, so a dropped filter's output is exactly zero and
channel pruning can remove it. ``loss="adversarial"`` trains ``G_C`` with the plain GAN loss
``L_G(G_C)`` instead: the one-shot-prune + fine-tune baseline, on the same code and budget.

The caller's generator and discriminator are never mutated: the loop trains copies.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from tilefx.errors import RecipeError
from tilefx.options import option, options

from .passes.metadata import BlockSparsity, matrix_view
from .passes.training.calibration import Calibration
from .passes.training.gradual_pruning import GradualBlockPruning, MaskedWeight
from .passes.training.loop import LoopHook, LoopOptions, train
from .passes.training.sparsity_schedule import SparsitySchedule

__all__ = [
    "GANCompressionOptions",
    "GANCompressionResult",
    "GANLosses",
    "GANPlayers",
    "Granularity",
    "StepCallback",
    "compress_generator",
    "consistency_losses",
    "gan_losses",
    "player_losses",
    "prunable_weights",
    "train_gan",
]

Granularity = Literal["element", "filter"]
LatentSampler = Callable[[int], torch.Tensor]
StepCallback = Callable[[int, "GANPlayers", GradualBlockPruning], None]

_PRUNABLE = (nn.Linear, nn.Conv2d)


@options
class GANCompressionOptions:
    """SSGAC's knobs (defaults: the paper's λ and schedule).

    sparsity: the target fraction of each pruned weight's elements (element) or output channels
    (filter) dropped. initial / ramp: the schedule starts at ``initial`` and reaches the target at
    ``ramp · steps`` (paper: 5% → target by half-way); ``every``: steps between mask re-selections.
    steps / lr: the compression run on the one loop (AdamW with ``betas``, constant lr).
    protect: module names of ``nn.Linear``/``nn.Conv2d`` layers left dense; with
    ``granularity="filter"`` the generator's last such layer (it writes the image) is always kept.
    loss: "consistency" (SSGAC) or "adversarial" (plain GAN loss: the fine-tune baseline).
    schedule: "gradual" (SSGAC) or "oneshot" (the target from step 0: the baseline).
    """

    sparsity: float = option(gt=0, lt=1)
    granularity: Granularity = "element"
    lambda_d: float = option(default=0.5, ge=0)
    initial: float = option(default=0.05, ge=0, lt=1)
    ramp: float = option(default=0.5, gt=0, le=1)
    every: int = option(default=1, ge=1)
    steps: int = option(default=400, ge=0)
    lr: float = option(default=2e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    protect: tuple[str, ...] = ()
    loss: Literal["consistency", "adversarial"] = "consistency"
    schedule: Literal["gradual", "oneshot"] = "gradual"
    seed: int = option(default=0, ge=0)

    def check(self) -> None:
        if not all(0 <= b < 1 for b in self.betas):
            raise RecipeError(
                f"GANCompressionOptions.betas must be two numbers in [0, 1), got {self.betas!r}"
            )

    def sparsity_schedule(self) -> SparsitySchedule:
        """``initial`` at step 0 → ``sparsity`` exactly at ``round(ramp · steps)`` (cubic)."""
        if self.schedule == "oneshot":
            return SparsitySchedule(self.sparsity, kind="oneshot")
        end = round(self.ramp * self.steps)
        return SparsitySchedule(
            self.sparsity, end=end, every=self.every, initial=min(self.initial, self.sparsity)
        )


class GANPlayers(nn.Module):
    """The module the loop trains: the compressed generator and the discriminator, side by side."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator


@dataclass(frozen=True)
class GANLosses:
    """Batch-mean losses: the generator's ``L_G`` and the discriminator's ``L_D`` against it."""

    generator: torch.Tensor
    discriminator: torch.Tensor


def gan_losses(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> GANLosses:
    """Non-saturating losses of ``fake`` against ``real`` under ``discriminator`` (logits)."""
    return _losses(discriminator(real), discriminator(fake))


def player_losses(
    discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor
) -> tuple[GANLosses, torch.Tensor]:
    """The losses built for training, each reaching one player only.

    First: ``L_G`` and ``L_D`` as the generator sees them — ``D`` read through detached
    parameters, so they reach ``fake``'s producer and never ``D``. Second: ``L_D`` as the
    discriminator trains on it — ``fake`` detached, so it reaches ``D`` only.
    """
    frozen = {name: p.detach() for name, p in discriminator.named_parameters()}
    frozen.update(dict(discriminator.named_buffers()))
    as_generator_sees = _losses(
        functional_call(discriminator, frozen, (real,)), functional_call(discriminator, frozen, (fake,))
    )
    own = _losses(discriminator(real), discriminator(fake.detach())).discriminator
    return as_generator_sees, own


def _losses(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> GANLosses:
    generator = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    discriminator = F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return GANLosses(generator, discriminator)


def consistency_losses(student: GANLosses, teacher: GANLosses) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_GC, L_DC)``: each normalised absolute difference of a loss value from the teacher's."""
    generative = (student.generator - teacher.generator.detach()).abs() / teacher.generator.detach().abs()
    discriminative = (
        student.discriminator - teacher.discriminator.detach()
    ).abs() / teacher.discriminator.detach().abs()
    return generative, discriminative


def prunable_weights(
    generator: nn.Module, granularity: Granularity, protect: Sequence[str] = ()
) -> list[str]:
    """Names of the weights to mask: every ``nn.Linear``/``nn.Conv2d`` weight not in ``protect``.

    Filter granularity keeps the last such layer dense: its output channels are the image's.
    """
    layers = [name for name, m in generator.named_modules() if isinstance(m, _PRUNABLE)]
    unknown = sorted(set(protect) - set(layers))
    if unknown:
        raise RecipeError(
            f"GANCompressionOptions.protect names no nn.Linear/nn.Conv2d of the generator: {unknown}; "
            f"its layers are {layers}"
        )
    if granularity == "filter" and layers:
        layers = layers[:-1]
    names = [f"{layer}.weight" if layer else "weight" for layer in layers if layer not in protect]
    if not names:
        raise RecipeError(
            f"GANCompressionOptions: the generator has no {granularity}-prunable nn.Linear/nn.Conv2d layer "
            "(filter granularity keeps the last one dense)"
        )
    return names


class _OnStep(LoopHook):
    """Calls the user's ``on_step`` after each step (it runs after the mask hooks)."""

    def __init__(self, callback: StepCallback, players: GANPlayers, pruning: GradualBlockPruning) -> None:
        self.callback, self.players, self.pruning = callback, players, pruning

    def after_step(self, step: int) -> None:
        self.callback(step, self.players, self.pruning)


class _FilterBiases(LoopHook):
    """Zero the bias of every dropped filter whenever the filter masks are (re)applied."""

    def __init__(self, pruning: GradualBlockPruning, biases: Mapping[str, torch.Tensor]) -> None:
        self.pruning, self.biases = pruning, dict(biases)

    def before_step(self, step: int) -> None:
        self.apply()

    def after_step(self, step: int) -> None:
        self.apply()

    def apply(self) -> None:
        with torch.no_grad():
            for name, bias in self.biases.items():
                bias.mul_(self.pruning.masks[name].reshape(-1).to(bias.dtype))


@dataclass
class GANCompressionResult:
    """The trained copies and what was pruned.

    generator: ``G_C``, its dropped weights (and, for filters, biases) exact zeros.
    discriminator: the adapted copy of ``D``; teacher: the frozen dense copy ``G_O``.
    masks: per weight name, the kept blocks (1×1 for elements, one row per filter).
    losses: the loop's mean loss per step (the objective's total).
    """

    generator: nn.Module
    discriminator: nn.Module
    teacher: nn.Module
    granularity: Granularity
    masks: dict[str, BlockSparsity] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)

    def sparsity(self) -> float:
        """Fraction of the masked weights' elements that are dropped."""
        total = sum(int(m.element_mask(self._shape(n)).numel()) for n, m in self.masks.items())
        kept = sum(int(m.element_mask(self._shape(n)).sum()) for n, m in self.masks.items())
        return 1.0 - kept / max(total, 1)

    def _shape(self, name: str) -> torch.Size:
        return self.generator.get_parameter(name).shape


def compress_generator(
    generator: nn.Module,
    discriminator: nn.Module,
    real: Iterable[torch.Tensor],
    latent: LatentSampler,
    options: GANCompressionOptions,
    *,
    on_step: StepCallback | None = None,
) -> GANCompressionResult:
    """Train a sparse copy of ``generator`` (see the module docstring); the inputs stay untouched.

    real: batches of real samples (a list of tensors, re-iterated in a seeded order);
    latent: ``latent(n)`` draws a batch of ``n`` generator inputs (called inside the loop's
    seeded RNG, so a run is reproducible). on_step: called after every optimiser step, once the
    masks are re-applied, with the step, the players being trained and the pruning hook.
    """
    student, teacher = copy.deepcopy(generator), copy.deepcopy(generator)
    critic = copy.deepcopy(discriminator)
    teacher.requires_grad_(False)
    student.requires_grad_(True)
    critic.requires_grad_(True)
    names = prunable_weights(student, options.granularity, options.protect)
    pruning, hooks = _pruning_hooks(student, names, options)
    players = GANPlayers(student, critic)
    if on_step is not None:
        hooks.append(_OnStep(on_step, players, pruning))
    data = _real_batches(real)
    losses: list[float] = []
    if options.steps:
        objective = _objective(teacher, latent, options)
        loop = LoopOptions(
            steps=options.steps,
            lr=options.lr,
            betas=options.betas,
            decay="constant",
            seed=options.seed,
            progress=False,
        )
        losses = train(players, objective, data, loop, hooks).losses
    pruning.finish()
    for hook in hooks:
        if isinstance(hook, _FilterBiases):
            hook.apply()
    masks = {w.name: pruning.record(w) for w in pruning.weights}
    student.requires_grad_(False)
    critic.requires_grad_(False)
    return GANCompressionResult(student.eval(), critic.eval(), teacher, options.granularity, masks, losses)


def train_gan(
    generator: nn.Module,
    discriminator: nn.Module,
    real: Iterable[torch.Tensor],
    latent: LatentSampler,
    options: LoopOptions,
    hooks: Sequence[LoopHook] = (),
) -> list[float]:
    """Plain GAN training of ``generator`` and ``discriminator`` *in place* on the one loop.

    The same one-objective min-max as the compression (non-saturating losses); for training the
    dense teacher a benchmark starts from. Returns the loop's per-step losses.
    """
    players = GANPlayers(generator, discriminator)

    def objective(model: nn.Module, inputs: tuple[Any, ...], labels: Any) -> torch.Tensor:
        (batch,) = inputs
        fake = _generator(model)(latent(batch.shape[0]))
        as_generator_sees, discriminator_loss = player_losses(_discriminator(model), batch, fake)
        return as_generator_sees.generator + discriminator_loss

    return train(players, objective, _real_batches(real), options, hooks).losses


# ---- pieces ---------------------------------------------------------------------------------------
def _objective(teacher: nn.Module, latent: LatentSampler, options: GANCompressionOptions) -> Any:
    def objective(model: nn.Module, inputs: tuple[Any, ...], labels: Any) -> torch.Tensor:
        (batch,) = inputs
        z = latent(batch.shape[0])
        critic = _discriminator(model)
        student, discriminator_loss = player_losses(critic, batch, _generator(model)(z))
        if options.loss == "adversarial":
            return student.generator + discriminator_loss
        teacher.train(_generator(model).training)  # same mode: identical outputs when G_C = G_O
        with torch.no_grad():
            reference = gan_losses(critic, batch, teacher(z))
        generative, discriminative = consistency_losses(student, reference)
        # G_C's gradient: L_GC + λ·L_DC (D read detached); D's gradient: its own L_D(G_C).
        return generative + options.lambda_d * discriminative + discriminator_loss

    return objective


def _pruning_hooks(
    student: nn.Module, names: list[str], options: GANCompressionOptions
) -> tuple[GradualBlockPruning, list[LoopHook]]:
    weights = []
    for name in names:
        weight = student.get_parameter(name)
        block = (1, 1) if options.granularity == "element" else (1, matrix_view(weight).shape[1])
        weights.append(MaskedWeight(name, weight, block, options.sparsity))
    pruning = GradualBlockPruning(weights, options.sparsity_schedule(), "magnitude")
    hooks: list[LoopHook] = [pruning]
    if options.granularity == "filter":
        biases: dict[str, torch.Tensor] = {}
        for name in names:
            bias = getattr(student.get_submodule(name.rpartition(".")[0]), "bias", None)
            if isinstance(bias, torch.Tensor):
                biases[name] = bias
        hooks.append(_FilterBiases(pruning, biases))
    return pruning, hooks


def _real_batches(real: Iterable[torch.Tensor]) -> Calibration:
    batches = [(batch, None) for batch in real]
    if not batches or not all(isinstance(b, torch.Tensor) for b, _ in batches):
        raise RecipeError(
            "compress_generator: real must be a non-empty list of tensors (batches of real samples)"
        )
    return Calibration(batches)


def _generator(model: nn.Module) -> nn.Module:
    return _players(model).generator


def _discriminator(model: nn.Module) -> nn.Module:
    return _players(model).discriminator


def _players(model: nn.Module) -> GANPlayers:
    inner = getattr(model, "module", model)  # DistributedDataParallel wraps it
    if not isinstance(inner, GANPlayers):
        raise RecipeError(f"the GAN objective needs GANPlayers, got {type(inner).__name__}")
    return inner
