"""Interleaved timing: the one way tilefx times anything a decision or a result depends on.

On small shared machines load drifts within seconds, so contenders timed one after the other
compare two different machines. Here they take turns (A, B, A, B, ...), so a drift hits all alike;
each turn may first make ``burst - 1`` untimed calls so every contender is timed in its steady
state rather than right after another library's thread pool. The result of each contender is its
median and quartiles: the median decides (``compile``'s kernel-or-torch choice, benchmarks),
the quartiles say how far to trust it and are printed beside it.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from tqdm import tqdm

__all__ = ["Timing", "interleaved_times", "interleaved_timings"]


@dataclass(frozen=True)
class Timing:
    """Milliseconds of one contender: median and the interquartile range of ``samples`` calls."""

    median: float
    low: float
    high: float
    samples: int

    @staticmethod
    def of(times: list[float]) -> Timing:
        if not times:
            return Timing(float("nan"), float("nan"), float("nan"), 0)
        if len(times) < 2:
            return Timing(times[0], times[0], times[0], 1)
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
        return Timing(statistics.median(times), q1, q3, len(times))

    def describe(self) -> str:
        """``1.234 ms [1.200–1.300]``: the median and the quartiles."""
        return f"{self.median:.3f} ms [{self.low:.3f}–{self.high:.3f}]"


def interleaved_times(
    calls: Mapping[str, Callable[[], object]],
    rounds: int = 9,
    warmup: int = 2,
    burst: int = 1,
    progress: bool = False,
    shuffle: bool = False,
) -> dict[str, list[float]]:
    """ms of every timed call of each contender, taken round-robin (see the module docstring).

    ``warmup`` untimed calls of each first (thread pools, caches, first touch of the output).
    ``shuffle``: a new (seeded) order every round, so no contender always runs right after the
    same other one. ``progress``: a tqdm bar over the rounds, drawn only when stderr is a terminal.
    """
    order, rng = list(calls), random.Random(0)
    with torch.no_grad():
        for call in calls.values():
            for _ in range(warmup):
                call()
        times: dict[str, list[float]] = {name: [] for name in calls}
        bar = tqdm(range(rounds), desc="timing", disable=not (progress and sys.stderr.isatty()), leave=False)
        for _ in bar:
            if shuffle:
                rng.shuffle(order)
            for name in order:
                call = calls[name]
                for _ in range(burst - 1):
                    call()
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_timings(
    calls: Mapping[str, Callable[[], object]],
    rounds: int = 9,
    warmup: int = 2,
    burst: int = 1,
    progress: bool = False,
    shuffle: bool = False,
) -> dict[str, Timing]:
    """The :class:`Timing` of each contender from :func:`interleaved_times`."""
    times = interleaved_times(calls, rounds, warmup, burst, progress, shuffle)
    return {name: Timing.of(values) for name, values in times.items()}
