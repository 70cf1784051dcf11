"""Human-readable summaries of what a pipeline did: sizes, pass timings, verification, latency."""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from tilefx.passes.infra.instruments import PassTiming

from .report_html import max_relative_error, write_report

__all__ = [
    "count_parameters",
    "embedding_quality",
    "max_relative_error",
    "interleaved_medians_ms",
    "median_ms",
    "pass_table",
    "write_report",
]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def embedding_quality(dense: torch.Tensor, pruned: torch.Tensor) -> tuple[float, float]:
    """(mean cosine, nearest-neighbour agreement) of L2-normalised sentence embeddings [N, D].

    Agreement: the fraction of sentences whose most similar *other* sentence is the same under
    the pruned model as under the dense one (what a semantic search would return).
    """
    cosine = float((dense * pruned).sum(-1).mean())

    def neighbours(embeddings: torch.Tensor) -> torch.Tensor:
        similarity = embeddings @ embeddings.T
        similarity.fill_diagonal_(-2.0)
        return similarity.argmax(1)

    return cosine, float((neighbours(dense) == neighbours(pruned)).float().mean())


def median_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def interleaved_medians_ms(
    candidates: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3, progress: bool = False
) -> dict[str, float]:
    """Median ms of each candidate, run round-robin so machine noise hits them all alike."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.no_grad():
        for fn in candidates.values():
            for _ in range(warmup):
                fn()
        bar = tqdm(range(repeats), desc="bench", disable=not (progress and sys.stderr.isatty()), leave=False)
        for _ in bar:
            for name, fn in candidates.items():
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) if values else math.nan for name, values in samples.items()}


def pass_table(timings: Sequence[PassTiming]) -> str:
    rows = ["| pass | modified | seconds |", "|---|---|---|"]
    rows += [f"| {t.name} | {'yes' if t.modified else 'no'} | {t.seconds:.3f} |" for t in timings]
    return "\n".join(rows)
