"""Human-readable summaries of what a pipeline did: sizes, pass timings, verification, latency."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tilefx.passes.infra.instruments import PassTiming

from .report_html import max_relative_error, quantization_summary, write_report

__all__ = [
    "count_parameters",
    "embedding_quality",
    "max_relative_error",
    "pass_table",
    "quantization_summary",
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


def pass_table(timings: Sequence[PassTiming]) -> str:
    rows = ["| pass | modified | seconds |", "|---|---|---|"]
    rows += [f"| {t.name} | {'yes' if t.modified else 'no'} | {t.seconds:.3f} |" for t in timings]
    return "\n".join(rows)
