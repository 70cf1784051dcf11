"""Human-readable summaries of what a pipeline did: sizes, pass timings, verification, latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from tilefx.passes.infra.instruments import PassTiming

__all__ = ["count_parameters", "embedding_quality", "max_relative_error", "median_ms", "pass_table"]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def max_relative_error(actual: Any, expected: Any) -> float:
    """max |a − e| / max |e| over all output tensors (the verification instrument's measure)."""
    worst = 0.0
    for a, e in zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected), strict=True):
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            scale = max(float(e.abs().max()), 1e-6)
            worst = max(worst, float((a.double() - e.double()).abs().max()) / scale)
    return worst


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


def pass_table(timings: Sequence[PassTiming]) -> str:
    rows = ["| pass | modified | seconds |", "|---|---|---|"]
    rows += [f"| {t.name} | {'yes' if t.modified else 'no'} | {t.seconds:.3f} |" for t in timings]
    return "\n".join(rows)
