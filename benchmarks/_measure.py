"""Shared measurements for the benchmarks: MACs, parameters, latency, machine line, dense peers."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from tilefx.timing import Timing, interleaved_timings  # one timing loop for every benchmark

__all__ = [
    "Timing",
    "count_macs",
    "count_params",
    "interleaved_timings",
    "machine",
    "onednn_linear",
    "save_result",
]


def count_macs(model: torch.nn.Module, inputs: Sequence[Any]) -> int:
    """Multiply-accumulates of one forward pass (torch.utils.flop_counter's FLOPs / 2)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs)
    return counter.get_total_flops() // 2


def count_params(model: torch.nn.Module) -> int:
    """Parameters (shared ones once); buffers such as BN running statistics are not counted."""
    return sum(p.numel() for p in model.parameters())


def machine() -> str:
    return (
        f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores visible, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def onednn_linear(
    weight: torch.Tensor, bias: torch.Tensor | None = None
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torch's other dense fp32 GEMM: oneDNN on a prepacked weight (what inductor's CPU freezing
    emits for a linear); None where torch was built without it.

    ``F.linear`` calls MKL's sgemm, which on AMD cores ran at under half oneDNN's speed (3.0 vs
    1.2 ms for BERT's FFN1 on a Zen 5 EPYC), so a speedup quoted only against ``F.linear`` would
    flatter a kernel there. The result is checked against ``F.linear`` before it is returned.
    """
    if not torch.backends.mkldnn.is_available():
        return None
    batch = 128  # a hint for the packing layout, not a constraint on the inputs
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    probe = torch.randn(batch, weight.shape[1], generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.linear(probe, weight.detach(), bias)
    assert torch.allclose(run(probe), expected, rtol=1e-4, atol=1e-3), "oneDNN linear disagrees"
    return run


def save_result(path: Path, title: str, body: str) -> None:
    """Write a result as markdown, naming the command, the commit and the machine it ran on."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    command = "python " + " ".join(sys.argv)
    path.write_text(f"# {title}\n\nCommand: `{command}` at commit `{commit}`; {machine()}.\n\n{body}\n")
