"""Per-layer choice between the block-sparse kernel and dense torch, so lowering never slows a layer.

A BSR kernel beats torch dense only when the block shape and the dropped fraction leave it
enough work saved: on BERT FFN shapes (AVX2, 2 threads, ``benchmarks/results/kernels_cpu_*``)
1×1 and 1×16 blocks at 50% sparsity ran at 0.4–1.0× of dense while 16×1 at 90% ran 7–8.5×
faster, and a ResNet 3×3 conv at 50% was slower than dense for most blocks. Whether a layer wins depends on
its shape, its block, its density and the host, so ``fallback="measure"`` (the default of
``compile_graph``) times both on the layer's real input shape at compile time, interleaved so
load from other processes hits them alike, and keeps the kernel only if its median time is
strictly lower. The times are medians of turns taken in rotation, each turn after two untimed
calls of the same contender (``tilefx.timing``), so preemption on the shared machines hits
both alike and neither is timed right after the other's thread pool; the quartiles are kept
beside the medians (``LayerChoice.describe``), so a close call shows as one. ``"never"`` always
lowers (benchmarks, tests, targets whose device is absent).

A quantized (int8/bf16) layer always runs a kernel of its format: torch's fake-quant graph is
the slow simulation of it, not a contender. What is measured there is its block-sparse kernel
against the dense kernel of the same format (``number_format`` in :func:`choose`), and the
faster is kept (``LayerChoice.sparse``).

The timer is injectable so the decision logic is tested without timing anything. TVM-free.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from tilefx.errors import LoweringError
from tilefx.timing import Timing, interleaved_timings

__all__ = [
    "FALLBACKS",
    "Fallback",
    "LayerChoice",
    "Timer",
    "check_fallback",
    "choose",
    "median_of",
    "interleaved_median_ms",
]

log = logging.getLogger(__name__)

Fallback = Literal["measure", "never"]
FALLBACKS: tuple[Fallback, ...] = ("measure", "never")
#: Times named zero-argument calls; returns a representative milliseconds per name.
#: Times named zero-argument calls: their ``Timing`` (median, quartiles), or plain milliseconds.
Timer = Callable[[Mapping[str, Callable[[], object]]], Mapping[str, "float | Timing"]]


@dataclass(frozen=True)
class LayerChoice:
    """What ``compile_graph`` did with one planned layer, and the evidence."""

    node: str
    lowered: bool
    sparse_ms: float | None = None  # medians
    dense_ms: float | None = None
    #: Sparse linears this one hands its output to transposed (``runtime.sparse_modules``).
    transposed_to: tuple[str, ...] = ()
    sparse_quartiles: tuple[float, float] | None = None
    dense_quartiles: tuple[float, float] | None = None
    #: "fp32", or the quantized layer's format, whose kernels run whichever is chosen.
    number_format: str = "fp32"
    #: A quantized layer: its block-sparse kernel runs (False: its format's dense kernel). For
    #: fp32 layers ``lowered`` says it all and this stays True.
    sparse: bool = True

    def describe(self) -> str:
        narrow = self.number_format != "fp32"
        dense_name = f"{self.number_format} dense kernel" if narrow else "dense torch"
        sparse_name = f"{self.number_format} block-sparse kernel" if narrow else "block-sparse kernel"
        verdict = sparse_name if self.lowered and self.sparse else dense_name
        handoff = f", output Yᵀ to {', '.join(self.transposed_to)}" if self.transposed_to else ""
        if self.sparse_ms is None or self.dense_ms is None:
            return f"node {self.node}: {verdict} (not measured){handoff}"
        dense_label = f"{self.number_format} dense" if narrow else "dense"
        return (
            f"node {self.node}: {verdict} (kernel {self.sparse_ms:.3f} ms{_range(self.sparse_quartiles)}, "
            f"{dense_label} {self.dense_ms:.3f} ms{_range(self.dense_quartiles)}, "
            f"{self.dense_ms / self.sparse_ms:.2f}x){handoff}"
        )


def _range(quartiles: tuple[float, float] | None) -> str:
    return (
        ""
        if quartiles is None or quartiles[0] == quartiles[1]
        else f" [{quartiles[0]:.3f}–{quartiles[1]:.3f}]"
    )


def interleaved_median_ms(calls: Mapping[str, Callable[[], object]]) -> dict[str, Timing]:
    """The default ``Timer``: each call's median and quartiles over 15 interleaved rounds, each
    turn timed after two untimed calls of its own (``tilefx.timing``)."""
    return interleaved_timings(calls, rounds=15, warmup=2, burst=3)


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
    timer: Timer = interleaved_median_ms,
    number_format: str = "fp32",
) -> LayerChoice:
    """Keep the kernel for ``node`` unless, measured, it is not strictly faster than ``dense``:
    dense torch, or for a quantized layer (``number_format`` int8/bf16) the dense kernel of its
    format, which then runs instead (the layer stays lowered)."""
    if fallback == "never":
        return LayerChoice(node, lowered=True, number_format=number_format)
    timed = {name: _timing(value) for name, value in timer({"sparse": sparse, "dense": dense}).items()}
    kernel, torch_ = timed["sparse"], timed["dense"]
    faster = kernel.median < torch_.median
    choice = LayerChoice(
        node,
        faster or number_format != "fp32",
        kernel.median,
        torch_.median,
        sparse_quartiles=(kernel.low, kernel.high),
        dense_quartiles=(torch_.low, torch_.high),
        number_format=number_format,
        sparse=faster or number_format == "fp32",
    )
    log.info("%s", choice.describe())
    return choice


def median_of(value: float | Timing) -> float:
    """A timer's answer as milliseconds (fake timers in tests answer plain numbers)."""
    return value.median if isinstance(value, Timing) else float(value)


def _timing(value: float | Timing) -> Timing:
    return value if isinstance(value, Timing) else Timing(float(value), float(value), float(value), 1)
