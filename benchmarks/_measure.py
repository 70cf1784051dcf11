"""Shared measurements for the channel-pruning benchmarks: MACs, parameters, latency, machine line."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from tilefx.report import median_ms  # one timing loop for every benchmark

__all__ = ["count_macs", "count_params", "machine", "median_ms"]


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
