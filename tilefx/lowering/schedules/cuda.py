"""CUDA schedule: how many rows of X each thread block of ``kernels.bsr_dense_cuda`` takes.

Enough rows that a thread block has about ``_THREADS`` threads (one per output of its X rows ×
the block's ``r`` rows), which gives the warps to hide global-memory latency, but never more
rows than X has.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm

from ..kernels.bsr_dense_cuda import thread_rows_func
from ..kernels.spec import KernelSpec

__all__ = ["CudaSchedule", "choose_cuda_schedule", "cuda_kernel"]

#: Threads per block we aim for: enough warps to hide global-memory latency.
_THREADS = 256


@dataclass(frozen=True)
class CudaSchedule:
    rows_per_block: int


def choose_cuda_schedule(spec: KernelSpec) -> CudaSchedule:
    r = spec.block[0]
    rows = max(1, min(_THREADS // r, spec.geometry.m))
    return CudaSchedule(rows_per_block=rows)


def cuda_kernel(spec: KernelSpec, schedule: CudaSchedule | None = None) -> tvm.tirx.PrimFunc:
    """The scheduled CUDA TensorIR for ``spec`` (``schedule`` overrides the choice)."""
    schedule = schedule or choose_cuda_schedule(spec)
    return thread_rows_func(spec, schedule.rows_per_block)
