"""CPU schedules for the legalised TIR a whole-model artifact runs between our kernels.

TVM 0.27's CPU pipeline legalises Relax ops to TIR and compiles it unscheduled: every loop nest
runs on one thread. dlight's CPU rules cover reductions (softmax, norms) and GEMV only; for the
rest (attention's batched matmuls, elementwise, pooling, reshapes) ``ParallelLoops`` runs the
outer spatial loops of each loop nest on TVM's thread pool and keeps the innermost spatial loop
after the reduction, where it is contiguous and LLVM vectorises it. Our kernels are marked
scheduled and left alone.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import s_tir
from tvm.s_tir import dlight
from tvm.s_tir.dlight.base import try_inline

__all__ = ["ParallelLoops", "schedule_leftovers"]

#: Spatial iterations a parallel loop needs before it is worth waking the thread pool.
_MIN_PARALLEL = 64


class ParallelLoops(dlight.ScheduleRule):
    """Producers inlined; outer spatial loops fused and parallel; reductions inside; the last
    spatial loop innermost."""

    def apply(self, func: Any, target: tvm.target.Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tvm.tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = dlight.analysis.normalize_prim_func(sch)
        if infos is None:
            return None
        # A fused chain of reshapes and transposes otherwise copies the tensor once per op.
        infos = try_inline(sch, infos)
        for info in infos:
            _schedule_block(sch, info)
        return sch

    def is_target_available(self, target: tvm.target.Target) -> bool:
        return str(target.kind.name) == "llvm"


def _schedule_block(sch: s_tir.Schedule, info: Any) -> None:
    loops = sch.get_loops(info.block_rv)
    kinds = info.dom_kind()
    spatial = [loop for loop, kind in zip(loops, kinds, strict=False) if kind == "S"]
    reduce = [loop for loop, kind in zip(loops, kinds, strict=False) if kind == "R"]
    if not spatial or len(spatial) + len(reduce) != len(loops):
        return
    inner = spatial[-1:] if len(spatial) > 1 else []
    outer = spatial[: len(spatial) - len(inner)]
    sch.reorder(*outer, *reduce, *inner)
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    extent = sch.get(fused).extent
    if isinstance(extent, tvm.tirx.IntImm) and int(extent) >= _MIN_PARALLEL or inner:
        sch.parallel(fused)
    if reduce and inner:
        sch.decompose_reduction(info.block_rv, reduce[0])


def schedule_leftovers(target: tvm.target.Target) -> tvm.transform.Pass:
    """dlight's CPU rules, then ``ParallelLoops`` for every PrimFunc no rule scheduled."""
    del target  # the rules read the target from the enclosing ``with target`` scope
    rules = dlight.ApplyDefaultSchedule(dlight.cpu.Reduction(), dlight.cpu.GEMV(), ParallelLoops())
    return rules
