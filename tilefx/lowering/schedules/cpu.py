"""CPU (llvm) schedules: which template and which tile sizes, from the block and the host.

The register file drives everything. AVX2 has 16 vector registers, so a task keeps at most 12
accumulator vectors live and leaves the rest for the W vector and the X broadcasts; AVX-512 has
32, and 16 accumulators measured 1.2–1.3× faster than 8–12 there. Three templates cover the
block shapes:

* ``rows`` (``kernels.bsr_dense.row_lanes_func``): lanes along the block's r output rows, for
  linear layers with tall blocks — W blocks are vector loads, X rows are broadcasts, the output
  is written row-major directly, and tasks sweep a group of block rows per cached X tile.
* ``panels`` (``kernels.bsr_token_panels.token_panels_func``): lanes along X's rows (tokens),
  for linear layers with narrower blocks; each thread owns its tokens (packs them, computes
  them, writes their rows of Y), see that module.
* ``tokens`` (``kernels.bsr_tokens.token_lanes_func``): the same lanes for every conv (whose
  NCHW output is token-contiguous), over an im2col or the padded planes.

Where ``rows`` starts paying differs by ISA (2 threads, BERT FFN shapes at 50 and 90%, measured
side by side): on AVX2 (AMD znver3) from r = lanes, where it beat the token lanes by 1.2–1.8× at
8×8; on AVX-512 (Intel Xeon) only from r = 2·lanes: at 16×1 the token lanes were 1.2–1.8×
faster, at 32×32 ``rows`` 1.1–1.5×. Batch 1 (or any M below one vector) always uses ``rows``:
vectorising along M would waste nearly all lanes on zero padding.

``panels`` takes at most 8 of a block's rows per pass and 4 vectors of tokens (8×1 at 50–70%:
8 rows × 2 vectors 1.6–2.1× dense against 1.5–2.1× for 4 × 4; 16×1 at 90% the two within noise
of each other, 6.5–7.5×; 1×1: 4 vectors 0.72–0.80× and 3.3–3.5× at 50 / 90%, 8 vectors
0.76× and 3.1–3.2×; MiniLM/BERT FFN shapes, 2 threads, Xeon), and splits
the threads over token tiles where their count allows, else over block rows as well
(``row_parts``). Between two sparse linears (``takes_transposed``) it needs neither the pack of
X nor the transpose of Y; with the earlier ``tokens`` template that beat ``rows`` on AVX-512 even
at 32×32, so the hand-over is taken on AVX-512 for every block. With ``panels`` (2026-12-07 grid,
MiniLM FFN at 90%, 32×32) it is a wash over the pair: FFN1 writing Yᵀ 6.8× dense against 8.2×
for ``rows``, FFN2 reading Xᵀ 10.5× against 8.9×.

**int8 and bf16** (``narrow_kernel``; AVX-512 with VNNI / BF16 only, checked by
``lowering.build``) have their own templates, chosen from the block alone, with the prototype's
measured tiles (Zen 5, MiniLM and BERT-base FFN shapes): int8 ``(16, 4)`` blocks run
``int8_bsr_rows`` (16 rows per task), ``(r, 4)`` with r ∈ {1, 2, 4, 8} ``int8_bsr_tokens``
(1×4: 8 token vectors per task; 4×4: 4 at M ≥ 512, else 2 with 2 partial-sum chains), dense
int8 ``int8_dense`` (8 rows × 3 vectors of 16 outputs, or 2 or 1 where 3 does not divide N/16).
A coarser block whose sides are multiples of those is the same pattern in template blocks
(``narrow_block``); any other block runs dense. bf16: ``(r, 2)`` blocks ``bf16_bsr_tokens``
(4 token vectors), dense ``bf16_dense`` (6 rows × 3 vectors).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Literal

import tvm

from ...runtime.layout import token_pitch
from ..compat import vector_lanes
from ..kernels.bf16_bsr_tokens import bf16_tokens_func
from ..kernels.bf16_dense import bf16_dense_func
from ..kernels.bsr_dense import row_lanes_func
from ..kernels.bsr_token_panels import token_panels_func
from ..kernels.bsr_tokens import token_lanes_func
from ..kernels.int8_bsr_rows import ROWS_BLOCK, int8_rows_func
from ..kernels.int8_bsr_tokens import TOKEN_ROWS, int8_tokens_func
from ..kernels.int8_common import MAX_K as MAX_INT8_K
from ..kernels.int8_dense import int8_dense_func
from ..kernels.spec import KernelSpec, NumberFormat

__all__ = [
    "CpuSchedule",
    "choose_cpu_schedule",
    "cpu_kernel",
    "narrow_block",
    "narrow_kernel",
    "narrow_unsupported",
    "takes_transposed",
]

log = logging.getLogger(__name__)

#: W bytes one group of block rows may hold, so they stay in L2 while X tiles take turns.
_GROUP_BYTES = 256 * 1024


@dataclass(frozen=True)
class CpuSchedule:
    """One point of the CPU schedule space.

    ``tile`` is rows of X per task, ``row_chunk`` lanes (``rows``) or block rows per pass (token
    lanes); ``rows`` sweeps ``group`` block rows per X tile; ``rows`` and ``panels`` split the X
    tiles into ``parts`` (one per thread), ``panels`` the block rows into ``row_parts`` as well.
    ``tokens`` (convs) keeps block-row-major tasks: reordering them measured no gain.
    """

    template: Literal["rows", "tokens", "panels"]
    tile: int
    row_chunk: int
    group: int = 1
    parts: int = 1
    row_parts: int = 1


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
    """Whether ``spec``'s linear layer may read Xᵀ and write Yᵀ (run as ``panels``).

    Only ``panels`` computes in that layout. A layer that would schedule as ``rows`` keeps
    row-major X and Y unless the host's measurements say the hand-over wins anyway; batches
    below one vector of tokens always stay ``rows``.
    """
    if not spec.geometry.is_dense or spec.geometry.m < lanes or _transposed_tile(spec, lanes) is None:
        return False
    plain = dataclasses.replace(spec, x_transposed=False, y_transposed=False)
    return choose_cpu_schedule(plain, lanes).template == "panels" or _registers(lanes).handover_beats_rows


def _panel_chunk_and_vectors(r: int, lanes: int) -> tuple[int, int]:
    """Block rows per pass and token vectors for ``panels``: up to 8 rows, up to 4 vectors, a
    power of two within the accumulator budget (see the module docstring)."""
    chunk = _largest_divisor(r, 8)
    room = _registers(lanes).accumulators // chunk
    return chunk, max(v for v in (1, 2, 4) if v <= room)


def _transposed_tile(spec: KernelSpec, lanes: int) -> int | None:
    """The widest ``panels`` tile within the register budget that divides the token pitch, if any."""
    _, vectors = _panel_chunk_and_vectors(spec.block[0], lanes)
    pitch = token_pitch(spec.geometry.m)
    fits = [lanes * v for v in (4, 2, 1) if v <= vectors and pitch % (lanes * v) == 0]
    return fits[0] if fits else None


def _panels(spec: KernelSpec, tile: int, chunk: int, threads: int) -> CpuSchedule:
    """``panels`` with ``tile`` tokens: threads over token tiles, over block rows for the rest."""
    transposed = spec.x_transposed or spec.y_transposed
    tiles = -(-(token_pitch(spec.geometry.m) if transposed else spec.geometry.m) // tile)
    parts = math.gcd(tiles, threads)
    row_parts = threads // parts if spec.num_block_rows % (threads // parts) == 0 else 1
    return CpuSchedule("panels", tile=tile, row_chunk=chunk, parts=parts, row_parts=row_parts)


def choose_cpu_schedule(spec: KernelSpec, lanes: int, threads: int = 1) -> CpuSchedule:
    """Template and tiles for ``spec`` on a CPU with ``lanes`` fp32 lanes and ``threads`` workers."""
    r, _ = spec.block
    m = spec.geometry.m
    regs = _registers(lanes)
    if spec.x_transposed or spec.y_transposed:
        tile = _transposed_tile(spec, lanes)
        if tile is None:
            raise ValueError(f"no token tile of {lanes}-lane vectors divides the pitch of M = {m} for {spec}")
        return _panels(spec, tile, _panel_chunk_and_vectors(r, lanes)[0], threads)
    if spec.geometry.is_dense and (r >= regs.rows_from or m < lanes):
        # Chunks of at most two vectors keep rows × chunk within the accumulator budget.
        chunk = _largest_divisor(r, 2 * lanes)
        vectors = max(1, chunk // lanes)
        tile = max(1, min(regs.accumulators // vectors, m, regs.max_rows))
        tiles = -(-m // tile)
        parts = threads if tiles % threads == 0 else 1  # batch 1: threads split block rows instead
        return CpuSchedule("rows", tile=tile, row_chunk=chunk, group=_group(spec), parts=parts)
    if spec.geometry.is_dense:
        chunk, vectors = _panel_chunk_and_vectors(r, lanes)
        tile = min(lanes * vectors, lanes * -(-m // lanes))  # never pad a small M beyond its last vector
        return _panels(spec, tile, chunk, threads)
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
    if spec.number_format != "fp32":
        return narrow_kernel(spec)
    if schedule is None:
        schedule = choose_cpu_schedule(spec, vector_lanes(target), int(target.attrs.get("num-cores", 1)))
    log.debug("cpu schedule for %s: %s", spec, schedule)
    if schedule.template == "rows":
        return row_lanes_func(spec, schedule.tile, schedule.row_chunk, schedule.group, schedule.parts)
    if schedule.template == "panels":
        return token_panels_func(spec, schedule.tile, schedule.row_chunk, schedule.parts, schedule.row_parts)
    return token_lanes_func(spec, schedule.tile, schedule.row_chunk)


#: Block widths of the narrow formats' templates: one VNNI word (4 k), one bf16 pair (2 k).
_WIDTH: dict[NumberFormat, int] = {"int8": 4, "bf16": 2}
#: Block heights of the token-lane templates.
_HEIGHTS: dict[NumberFormat, tuple[int, ...]] = {"int8": TOKEN_ROWS, "bf16": (1, 2, 4, 8)}


def narrow_block(number_format: NumberFormat, block: tuple[int, int]) -> tuple[int, int] | None:
    """The template block that computes ``block``'s pattern exactly (a ``(32, 8)`` block is four
    ``(16, 4)`` ones), or None when no int8/bf16 block template tiles it (the layer runs dense)."""
    r, c = block
    width = _WIDTH[number_format]
    if c % width:
        return None
    if number_format == "int8" and r % ROWS_BLOCK[0] == 0:
        return ROWS_BLOCK
    return max(h for h in _HEIGHTS[number_format] if r % h == 0), width


def narrow_unsupported(spec: KernelSpec) -> str | None:
    """Why no template computes ``spec`` (its shape), or None when one does."""
    k, n = spec.geometry.k, spec.n
    if spec.number_format == "int8":
        if k % 16 or n % 16:
            return f"int8 kernels need in_features % 16 == 0 and out_features % 16 == 0, got {k} and {n}"
        if k > MAX_INT8_K:
            return f"in_features {k} could overflow int32 accumulators (at most {MAX_INT8_K})"
        if spec.weight_layout == "bsr" and spec.block[0] < 16 and k % 64:
            return f"int8 {spec.block[0]}x4 blocks need in_features % 64 == 0, got {k}"
        return None
    if k % 32 or n % 16:
        return f"bf16 kernels need in_features % 32 == 0 and out_features % 16 == 0, got {k} and {n}"
    return None


def narrow_kernel(spec: KernelSpec) -> tvm.tirx.PrimFunc:
    """The int8 or bf16 template for ``spec`` with the prototype's measured tiles (module docstring)."""
    problem = narrow_unsupported(spec)
    if problem is not None:
        raise ValueError(f"{problem}: {spec}")
    m, n, r = spec.geometry.m, spec.n, spec.block[0]
    token_vectors = max(1, -(-m // 16))
    if spec.number_format == "bf16":
        if spec.weight_layout == "dense":
            return bf16_dense_func(spec, row_tile=min(6, m), vectors=_vectors(n, 3))
        return bf16_tokens_func(spec, vectors=_power_of_two_at_most(min(4, 24 // r), token_vectors))
    if spec.weight_layout == "dense":
        return int8_dense_func(spec, row_tile=min(8, m), vectors=_vectors(n, 3))
    if spec.block == ROWS_BLOCK:
        return int8_rows_func(spec, row_tile=min(16, m))
    wide = {1: 8, 2: 8, 4: 4 if m >= 512 else 2, 8: 2}[r]
    vectors = _power_of_two_at_most(wide, token_vectors)
    chains = 2 if r == 4 and vectors == 2 else 1
    return int8_tokens_func(spec, vectors=vectors, chains=chains)


def _vectors(n: int, most: int) -> int:
    """Output vectors of 16 per dense task: the most (≤ ``most``) dividing N/16."""
    return _largest_divisor(n // 16, most)


def _power_of_two_at_most(wanted: int, limit: int) -> int:
    """``wanted`` halved until it is at most ``limit`` (never pad a small M by many vectors)."""
    while wanted > 1 and wanted > limit:
        wanted //= 2
    return wanted
