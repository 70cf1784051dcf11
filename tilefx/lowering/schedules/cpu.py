"""CPU (llvm) schedules: which template and which tile sizes, from the block and the host.

The register file drives everything. AVX2 has 16 vector registers, so a task keeps at most 12
accumulator vectors live and leaves the rest for the W vector and the X broadcasts; AVX-512 has
32, and 16 accumulators measured 1.2–1.3× faster than 8–12 there. Two templates cover the
block shapes:

* ``rows`` (``kernels.bsr_dense.row_lanes_func``): lanes along the block's r output rows, for
  linear layers with tall blocks — W blocks are vector loads, X rows are broadcasts, the output
  is written row-major directly, and tasks sweep a group of block rows per cached X tile.
* ``tokens`` (``kernels.bsr_tokens.token_lanes_func``): lanes along X's rows (tokens, pixels),
  for narrower blocks and for every conv (whose NCHW output is token-contiguous).

Where ``rows`` starts paying differs by ISA (2 threads, BERT FFN shapes at 50 and 90%, measured
side by side): on AVX2 (AMD znver3) from r = lanes, where it beat ``tokens`` by 1.2–1.8× at 8×8;
on AVX-512 (Intel Xeon) only from r = 2·lanes: at 16×1 ``tokens`` was 1.2–1.8× faster, at
32×32 ``rows`` 1.1–1.5×. Batch 1 (or any M below one vector) always uses ``rows``: vectorising
along M would waste nearly all lanes on zero padding.

Between two sparse linears (``takes_transposed``) ``tokens`` needs neither the transpose of X
nor that of Y, which is a third to a half of its time at 90% sparsity on BERT's FFN; there it
beat ``rows`` on AVX-512 even at 32×32, so the hand-over is taken on AVX-512 for every block.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import tvm

from ...runtime.layout import token_pitch
from ..compat import vector_lanes
from ..kernels.bsr_dense import row_lanes_func
from ..kernels.bsr_tokens import token_lanes_func
from ..kernels.spec import KernelSpec

__all__ = ["CpuSchedule", "choose_cpu_schedule", "cpu_kernel", "takes_transposed"]

log = logging.getLogger(__name__)

#: W bytes one group of block rows may hold, so they stay in L2 while X tiles take turns.
_GROUP_BYTES = 256 * 1024


@dataclass(frozen=True)
class CpuSchedule:
    """One point of the CPU schedule space.

    ``tile`` is rows of X per task, ``row_chunk`` lanes; for ``rows`` only, ``group`` block rows
    are swept per X tile and the X tiles are split into ``parts`` (one per thread). ``tokens``
    keeps block-row-major tasks: reordering them measured no gain.
    """

    template: Literal["rows", "tokens"]
    tile: int
    row_chunk: int
    group: int = 1
    parts: int = 1


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


@dataclass(frozen=True)
class _Registers:
    """What a vector width allows: live accumulators, X rows per ``rows`` task, the least
    block height for which ``rows`` beats ``tokens`` (see the module docstring), and whether
    ``tokens`` handing over transposed activations beats ``rows`` even there."""

    accumulators: int
    max_rows: int
    rows_from: int
    handover_beats_rows: bool


def _registers(lanes: int) -> _Registers:
    if lanes >= 16:  # AVX-512: 32 registers
        # 32×32 on BERT FFN at 90%: FFN1 writing Yᵀ 6.9× dense vs 6.5× for `rows`, FFN2 reading
        # Xᵀ 8.0× vs 6.6× (side by side, Xeon, 2 threads).
        return _Registers(accumulators=16, max_rows=16, rows_from=2 * lanes, handover_beats_rows=True)
    # AVX2: `rows` beat `tokens` by 1.2–1.8× at 8×8 on its own; the hand-over is not measured there.
    return _Registers(accumulators=12, max_rows=8, rows_from=lanes, handover_beats_rows=False)


def _group(spec: KernelSpec) -> int:
    """Block rows whose stored W blocks (on average) fit in ``_GROUP_BYTES``."""
    r, c = spec.block
    rows = spec.num_block_rows
    row_bytes = max(1, spec.nnzb * r * c * 4 // rows)
    return _largest_divisor(rows, max(1, _GROUP_BYTES // row_bytes))


def takes_transposed(spec: KernelSpec, lanes: int) -> bool:
    """Whether ``spec``'s linear layer may read Xᵀ and write Yᵀ (run as ``tokens``).

    Only ``tokens`` computes in that layout. A layer that would schedule as ``rows`` keeps
    row-major X and Y unless the host's measurements say the hand-over wins anyway; batches
    below one vector of tokens always stay ``rows``.
    """
    if not spec.geometry.is_dense or spec.geometry.m < lanes or _transposed_tile(spec, lanes) is None:
        return False
    plain = dataclasses.replace(spec, x_transposed=False, y_transposed=False)
    return choose_cpu_schedule(plain, lanes).template == "tokens" or _registers(lanes).handover_beats_rows


def _transposed_tile(spec: KernelSpec, lanes: int) -> int | None:
    """The widest ``tokens`` tile within the register budget that divides the token pitch, if any."""
    chunk = _largest_divisor(spec.block[0], 4)
    budget = _registers(lanes).accumulators
    pitch = token_pitch(spec.geometry.m)
    fits = [lanes * v for v in (8, 4, 2, 1) if v * chunk <= budget and pitch % (lanes * v) == 0]
    return fits[0] if fits else None


def choose_cpu_schedule(spec: KernelSpec, lanes: int, threads: int = 1) -> CpuSchedule:
    """Template and tiles for ``spec`` on a CPU with ``lanes`` fp32 lanes and ``threads`` workers."""
    r, _ = spec.block
    m = spec.geometry.m
    regs = _registers(lanes)
    if spec.x_transposed or spec.y_transposed:
        tile = _transposed_tile(spec, lanes)
        if tile is None:
            raise ValueError(f"no token tile of {lanes}-lane vectors divides the pitch of M = {m} for {spec}")
        return CpuSchedule("tokens", tile=tile, row_chunk=_largest_divisor(r, 4))
    if spec.geometry.is_dense and (r >= regs.rows_from or m < lanes):
        # Chunks of at most two vectors keep rows × chunk within the accumulator budget.
        chunk = _largest_divisor(r, 2 * lanes)
        vectors = max(1, chunk // lanes)
        tile = max(1, min(regs.accumulators // vectors, m, regs.max_rows))
        tiles = -(-m // tile)
        parts = threads if tiles % threads == 0 else 1  # batch 1: threads split block rows instead
        return CpuSchedule("rows", tile=tile, row_chunk=chunk, group=_group(spec), parts=parts)
    chunk = _largest_divisor(r, 4)
    # Wide token tiles amortise the W broadcasts; keep chunk × tile/lanes within budget, and
    # a power of two so the usual M (128, 28·28·…) needs no padding.
    tile_vectors = max(v for v in (1, 2, 4, 8) if v * chunk <= regs.accumulators)
    tile = lanes * tile_vectors
    tile = min(tile, lanes * -(-m // lanes))  # never pad a small M beyond its last vector
    return CpuSchedule("tokens", tile=tile, row_chunk=chunk)


def cpu_kernel(
    spec: KernelSpec, target: tvm.target.Target, schedule: CpuSchedule | None = None
) -> tvm.tirx.PrimFunc:
    """The scheduled TensorIR for ``spec`` on the CPU ``target`` (``schedule`` overrides the choice)."""
    if schedule is None:
        schedule = choose_cpu_schedule(spec, vector_lanes(target), int(target.attrs.get("num-cores", 1)))
    log.debug("cpu schedule for %s: %s", spec, schedule)
    if schedule.template == "rows":
        return row_lanes_func(spec, schedule.tile, schedule.row_chunk, schedule.group, schedule.parts)
    return token_lanes_func(spec, schedule.tile, schedule.row_chunk)
