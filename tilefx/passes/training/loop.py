"""The one training loop: the only place in tilefx that calls ``backward()``.

Every training-time method is a loss plus hooks on this loop:

- the **objective** ``objective(model, inputs, labels) -> loss`` runs the forward itself (so it can
  read intermediate taps or a teacher) on the model the loop hands it — the DDP-wrapped one when
  ``torch.distributed`` is initialised;
- **hooks** (:class:`LoopHook`) add regularisers, read gradients (movement scores), re-select
  masks before a step (a sparsity schedule) and project after it (re-apply masks), and keep state
  that a checkpoint saves;
- batches come from a :class:`Calibration`, cycled over epochs in a seeded order. Under
  ``torch.distributed`` (``torchrun``: gloo on CPU, nccl on GPU) the model is wrapped in
  ``DistributedDataParallel``, rank ``r`` of ``w`` reads global batches ``r, r + w, …`` and only
  rank 0 writes checkpoints and draws the progress bar.

Determinism: the batch order depends only on the seed and the position, the RNG state and the
optimiser/scheduler/hook states are checkpointed, so resuming from a checkpoint reproduces the
uninterrupted run bit for bit (same machine, same thread count).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils._pytree as pytree
from tqdm import tqdm

from tilefx.errors import RecipeError
from tilefx.options import option, options

from .calibration import Batch, Calibration

__all__ = [
    "CHECKPOINT_NAME",
    "Decay",
    "LoopHook",
    "LoopOptions",
    "LoopResult",
    "Objective",
    "Optimizer",
    "broadcast_from_rank0",
    "checkpoint_path",
    "is_main_process",
    "show_progress",
    "train",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"

Objective = Callable[[nn.Module, tuple[Any, ...], Any], torch.Tensor]


Optimizer = Literal["adamw", "sgd"]
Decay = Literal["constant", "linear", "cosine"]


@options
class LoopOptions:
    """How to train: budget, optimiser, learning-rate schedule, accumulation, seeding, checkpoints.

    lr follows a linear warm-up over ``warmup`` (a fraction of ``steps``) and then ``decay``
    ("linear" or "cosine" to zero at the last step, or "constant"). accumulate: micro-batches per
    optimiser step. progress: a tqdm bar on rank 0, drawn only when stderr is a terminal.
    checkpoint_dir: save every ``checkpoint_every`` steps and at the end; a run finding a
    checkpoint there resumes from it. distributed: False trains locally on every batch even under
    ``torch.distributed`` (a method every rank runs identically on the same data, e.g. DCP's
    selection), with no DDP, no sharding and no all-reduce. Method options that train (``tilefx.Recovery``,
    ``tilefx.DirichletScaleMixture``, SSGAC's) extend this class, so these fields and their
    checks are written once.
    """

    steps: int = option(ge=0)
    lr: float = option(default=1e-4, gt=0)
    optimizer: Optimizer = "adamw"
    weight_decay: float = option(default=0.0, ge=0)
    momentum: float = option(default=0.9, ge=0)
    nesterov: bool = False
    warmup: float = option(default=0.0, ge=0, lt=1)
    decay: Decay = "linear"
    accumulate: int = option(default=1, ge=1)
    max_grad_norm: float | None = option(default=None, gt=0)
    seed: int = option(default=0, ge=0)
    shuffle: bool = True
    checkpoint_dir: str | None = None
    checkpoint_every: int = option(default=100, ge=1)
    progress: bool = True
    log_every: int = option(default=50, ge=1)
    distributed: bool = True
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's; GANs train with β₁ = 0.5


class LoopHook:
    """A piece of a training method that runs inside the loop; every method is a no-op by default.

    Order within one optimiser step: ``before_step`` → (forward, ``regularizer``, backward) per
    micro-batch → ``after_backward`` → optimiser step, then each hook's ``optimizers`` →
    ``after_step``. ``state_dict`` / ``load_state_dict`` carry what a checkpoint must restore
    (masks, scores).
    """

    name: str = ""

    def before_step(self, step: int) -> None:
        """Called before the step's first forward (e.g. re-select masks on a schedule)."""

    def regularizer(self) -> torch.Tensor | None:
        """A penalty added to every micro-batch's loss, or None."""
        return None

    def after_backward(self, step: int) -> None:
        """Gradients of the whole step are ready (all-reduced under DDP)."""

    def optimizers(self) -> Sequence[torch.optim.Optimizer]:
        """Optimisers of parameters the hook owns (not the model's, e.g. structure scores).

        The loop steps them right after the model's optimiser, from the gradients the hook set
        by ``after_backward``, so that every optimiser step of tilefx is taken here.
        """
        return ()

    def after_step(self, step: int) -> None:
        """After the optimiser updates (e.g. project: re-apply masks)."""

    def progress(self) -> dict[str, float]:
        """Numbers to show beside the loss in the progress bar."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


@dataclass
class LoopResult:
    """losses: the mean loss of every step run here (all ranks averaged); resumed_from: the step a
    checkpoint restored, or None."""

    steps: int
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None


def checkpoint_path(options: LoopOptions) -> Path | None:
    """Where a run with ``options`` saves and resumes (None: no checkpoints)."""
    return Path(options.checkpoint_dir) / CHECKPOINT_NAME if options.checkpoint_dir else None


def show_progress(enabled: bool) -> bool:
    """Draw a tqdm bar: asked for, stderr is a terminal, and this is rank 0."""
    return enabled and sys.stderr.isatty() and is_main_process()


def is_main_process() -> bool:
    return not _distributed() or dist.get_rank() == 0


def broadcast_from_rank0(tensor: torch.Tensor) -> None:
    """Make every rank hold rank 0's ``tensor`` (in place); a no-op outside torch.distributed."""
    if not _distributed():
        return
    if tensor.dtype == torch.bool:  # gloo does not reduce or broadcast bools
        carrier = tensor.to(torch.uint8)
        dist.broadcast(carrier, src=0)
        tensor.copy_(carrier.bool())
        return
    dist.broadcast(tensor, src=0)


def train(
    model: nn.Module,
    objective: Objective,
    data: Calibration,
    options: LoopOptions,
    hooks: Sequence[LoopHook] = (),
    params: Iterable[torch.Tensor] | None = None,
) -> LoopResult:
    """Train ``params`` (default: those of ``model`` that require grad) for ``options.steps`` steps.

    ``model`` is updated in place and trained in train mode; its modules' modes and the global RNG
    are left as they were (the loop runs in an RNG fork).
    """
    trainable = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not trainable:
        raise RecipeError("nothing to train: no parameter requires grad")
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.random.fork_rng(devices=_cuda_devices()):
            torch.manual_seed(options.seed)
            return _Run(model, objective, data, options, list(hooks), trainable).run()
    finally:
        for module, training in modes.items():
            module.training = training


class _Run:
    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        data: Calibration,
        options: LoopOptions,
        hooks: list[LoopHook],
        params: list[torch.Tensor],
    ) -> None:
        self.model, self.objective, self.options, self.hooks, self.params = (
            model,
            objective,
            options,
            hooks,
            params,
        )
        self.ddp = _distributed() and options.distributed
        # Unused parameters (an output no loss term reads) are allowed: find_unused_parameters.
        self.wrapped: nn.Module = (
            nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if self.ddp else model
        )
        self.optimizer = _optimizer(params, options)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(options))
        self.stream = _BatchStream(data, options.seed, options.shuffle)
        self.device = params[0].device
        self.checkpoint = checkpoint_path(options)

    def run(self) -> LoopResult:
        start = self._resume()
        result = LoopResult(self.options.steps, resumed_from=start if start else None)
        world, rank = _world() if self.ddp else (1, 0)
        batches = self.stream.shard(start * self.options.accumulate, rank, world)
        bar = tqdm(
            total=self.options.steps,
            initial=start,
            disable=not show_progress(self.options.progress),
            desc="recovery",
            dynamic_ncols=True,
        )
        with bar:
            for step in range(start, self.options.steps):
                loss = self._step(step, batches)
                result.losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}", **self._shown())
                if (step + 1) % self.options.log_every == 0:
                    log.info("step %d/%d loss %.5g %s", step + 1, self.options.steps, loss, self._shown())
                if (step + 1) % self.options.checkpoint_every == 0 or step + 1 == self.options.steps:
                    self._save(step + 1)
        return result

    def _step(self, step: int, batches: Iterator[Batch]) -> float:
        for hook in self.hooks:
            hook.before_step(step)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        count = self.options.accumulate
        for micro in range(count):
            inputs, labels = next(batches)
            inputs, labels = _to(inputs, self.device), _to(labels, self.device)
            last = micro == count - 1
            sync = contextlib.nullcontext() if last or not self.ddp else self.wrapped.no_sync()  # type: ignore[operator]
            with sync:
                loss = self.objective(self.wrapped, inputs, labels)
                penalties = [r for r in (h.regularizer() for h in self.hooks) if r is not None]
                (sum(penalties, loss) / count).backward()
            total += float(loss.detach())
        for hook in self.hooks:
            hook.after_backward(step)
        if self.options.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.params, self.options.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        for hook in self.hooks:
            for optimizer in hook.optimizers():
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        for hook in self.hooks:
            hook.after_step(step)
        if self.ddp:
            dist.all_reduce(total)
            total /= dist.get_world_size()
        return float(total) / count

    def _shown(self) -> dict[str, str]:
        shown: dict[str, str] = {}
        for hook in self.hooks:
            shown.update({k: f"{v:.3g}" for k, v in hook.progress().items()})
        return shown

    # ---- checkpoints ----------------------------------------------------------------------
    def _state(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "hooks": [hook.state_dict() for hook in self.hooks],
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "signature": _signature(self.model),
        }

    def _save(self, step: int) -> None:
        if self.checkpoint is None or not is_main_process():
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        partial = self.checkpoint.with_suffix(".partial")
        torch.save(self._state(step), partial)
        os.replace(partial, self.checkpoint)  # atomic: a kill leaves the previous checkpoint whole
        log.info("checkpoint at step %d in %s", step, self.checkpoint)

    def _resume(self) -> int:
        if self.checkpoint is None or not self.checkpoint.exists():
            return 0
        state = torch.load(self.checkpoint, map_location=self.device, weights_only=False)
        if state["signature"] != _signature(self.model):
            raise RecipeError(
                f"checkpoint {self.checkpoint} was written for a different model (parameter names or "
                "shapes differ); use another checkpoint_dir or delete it"
            )
        if state["step"] > self.options.steps:
            raise RecipeError(
                f"checkpoint {self.checkpoint} is at step {state['step']}, past steps={self.options.steps}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for hook, hook_state in zip(self.hooks, state["hooks"], strict=True):
            hook.load_state_dict(hook_state)
        torch.set_rng_state(state["rng"].cpu())
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        log.info("resuming from %s at step %d", self.checkpoint, state["step"])
        return int(state["step"])


class _BatchStream:
    """Global batch ``p`` of the endless stream is batch ``p mod n`` of epoch ``p // n``'s order.

    A sequence of batches is shuffled per epoch by a generator seeded with ``seed + epoch`` (so
    the order at any position is known without replaying); any other iterable is read in order.
    """

    def __init__(self, data: Calibration, seed: int, shuffle: bool) -> None:
        self.data, self.seed = data, seed
        batches = data.batches
        self.items: list[Any] | None = None
        if isinstance(batches, Sequence):
            limit = len(batches) if data.max_batches is None else min(len(batches), data.max_batches)
            self.items = list(batches[:limit])
            if not self.items:
                raise RecipeError("training data holds no batches")
        self.shuffle = shuffle and self.items is not None

    def shard(self, start: int, rank: int, world: int) -> Iterator[Batch]:
        """This rank's micro-batches from its ``start``-th on: global batches ``k·world + rank``."""
        for position, batch in enumerate(self._global()):
            if position % world == rank and position // world >= start:
                yield batch

    def _global(self) -> Iterator[Batch]:
        epoch = 0
        while True:
            seen = 0
            for batch in self._epoch(epoch):
                seen += 1
                yield batch
            if seen == 0:
                raise RecipeError("training data yielded no batches (a generator used twice?)")
            epoch += 1

    def _epoch(self, epoch: int) -> Iterable[Batch]:
        if self.items is None:
            return self.data
        order = range(len(self.items))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.items), generator=generator).tolist()  # type: ignore[assignment]
        return Calibration([self.items[i] for i in order])


def _optimizer(params: list[torch.Tensor], options: LoopOptions) -> torch.optim.Optimizer:
    if options.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=options.lr,
            momentum=options.momentum,
            weight_decay=options.weight_decay,
            nesterov=options.nesterov and options.momentum > 0,
        )
    # The fused kernel is several times faster than the per-tensor loop on CPU (22M parameters:
    # the step cost more than the forward pass), with the same arithmetic step for step.
    fused = all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params
    )
    return torch.optim.AdamW(
        params, lr=options.lr, betas=options.betas, weight_decay=options.weight_decay, fused=fused
    )


def _lr_factor(options: LoopOptions) -> Callable[[int], float]:
    warmup = math.ceil(options.warmup * options.steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if options.decay == "constant":
            return 1.0
        progress = (step - warmup) / max(options.steps - warmup, 1)
        if options.decay == "linear":
            return max(1.0 - progress, 0.0)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _signature(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def _to(value: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, value)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world() -> tuple[int, int]:
    return (dist.get_world_size(), dist.get_rank()) if _distributed() else (1, 0)


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
