"""Per-layer choice between the block-sparse kernel and dense torch, so lowering never slows a layer.

A BSR kernel beats torch dense only when the block shape and the dropped fraction leave it
enough work saved: on BERT FFN shapes (AVX2, 2 threads, ``benchmarks/results/kernels_cpu_*``)
1×1 and 1×16 blocks at 50% sparsity ran at 0.4–1.0× of dense while 16×1 at 90% ran 7–8.5×
faster, and a ResNet 3×3 conv at 50% was slower than dense for most blocks. Whether a layer wins depends on
its shape, its block, its density and the host, so ``fallback="measure"`` (the default of
``compile_graph``) times both on the layer's real input shape at compile time, interleaved so
load from other processes hits them alike, and keeps the kernel only if its best time is
strictly lower. Best, not median: preemption only ever adds time, and on the shared 2-core
machines here the medians of 384×384 kernels varied 0.4–6.7 ms within one compile (MiniLM
demo). ``"never"`` always lowers (benchmarks, tests, targets whose device is absent).

The timer is injectable so the decision logic is tested without timing anything. TVM-free.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from tilefx.errors import LoweringError

__all__ = [
    "FALLBACKS",
    "Fallback",
    "LayerChoice",
    "Timer",
    "check_fallback",
    "choose",
    "interleaved_best_ms",
    "interleaved_times",
]

log = logging.getLogger(__name__)

Fallback = Literal["measure", "never"]
FALLBACKS: tuple[Fallback, ...] = ("measure", "never")
#: Times named zero-argument calls; returns a representative milliseconds per name.
Timer = Callable[[Mapping[str, Callable[[], object]]], Mapping[str, float]]


@dataclass(frozen=True)
class LayerChoice:
    """What ``compile_graph`` did with one planned layer, and the evidence."""

    node: str
    lowered: bool
    sparse_ms: float | None = None
    dense_ms: float | None = None
    #: Sparse linears this one hands its output to transposed (``runtime.sparse_modules``).
    transposed_to: tuple[str, ...] = ()

    def describe(self) -> str:
        verdict = "block-sparse kernel" if self.lowered else "dense torch"
        handoff = f", output Yᵀ to {', '.join(self.transposed_to)}" if self.transposed_to else ""
        if self.sparse_ms is None or self.dense_ms is None:
            return f"node {self.node}: {verdict} (not measured){handoff}"
        return (
            f"node {self.node}: {verdict} (kernel {self.sparse_ms:.3f} ms, "
            f"dense {self.dense_ms:.3f} ms, {self.dense_ms / self.sparse_ms:.2f}x){handoff}"
        )


def interleaved_times(
    calls: Mapping[str, Callable[[], object]], rounds: int = 9, warmup: int = 2, burst: int = 1
) -> dict[str, list[float]]:
    """ms of every call of each, timed round-robin (A, B, A, B, ...) so drifting load hits all alike.

    With ``burst`` > 1 each turn makes ``burst - 1`` untimed calls first and times the next: the
    steady state of a call that follows itself, free of the other contender's thread pool.
    """
    with torch.no_grad():
        for call in calls.values():
            for _ in range(warmup):  # thread pools, caches, first-touch of the output
                call()
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                for _ in range(burst - 1):
                    call()
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_best_ms(calls: Mapping[str, Callable[[], object]]) -> dict[str, float]:
    """The default ``Timer``: the fastest of each call's ``interleaved_times``."""
    return {name: min(ts) for name, ts in interleaved_times(calls).items()}


def check_fallback(fallback: str) -> Fallback:
    """``fallback`` as a known policy; raises ``LoweringError`` naming the choices otherwise."""
    for known in FALLBACKS:
        if fallback == known:
            return known
    raise LoweringError(f"unknown fallback {fallback!r}: choose one of {', '.join(FALLBACKS)}")


def choose(
    node: str,
    sparse: Callable[[], object],
    dense: Callable[[], object],
    fallback: Fallback,
    timer: Timer = interleaved_best_ms,
) -> LayerChoice:
    """Keep the kernel for ``node`` unless, measured, it is not strictly faster than dense torch."""
    if fallback == "never":
        return LayerChoice(node, lowered=True)
    ms = timer({"sparse": sparse, "dense": dense})
    choice = LayerChoice(node, ms["sparse"] < ms["dense"], ms["sparse"], ms["dense"])
    log.info("%s", choice.describe())
    return choice
