"""Masked dense weights → BSR arrays (data, indices, indptr), validated; int8 and bf16 layouts.

The passes hand over a plain weight whose dropped blocks are zero plus a ``BlockSparsity``
record; reordering permutations are already folded into the weight, so packing is a pure
relayout with no gathers at run time. fp32 blocks are stored *transposed* (``data[nnzb, c, r]``)
because every fp32 kernel reads the ``r`` output features of one block column together.

The narrow formats (:class:`NarrowWeight`) differ because their dot-product instructions do:
``vpdpbusd`` wants, per int32 lane, 4 consecutive-k bytes of one output row, so int8 blocks are
stored **row-major** ``[nnzb, r, 4]`` (r = 16: one block is one 64-byte zmm; r < 16: each row's 4
bytes are one word the tokens kernel broadcasts) and a dense int8 weight in VNNI panels
``[N/16, K/4, 16, 4]``; with them go the per-channel scales ``sw``, the column sums
``cs[n] = Σ_k q[n, k]`` (the zero-point correction) and the static activation grid ``aq``.
``vdpbf16ps`` wants pairs of k: bf16 weights (kept fp32, converted in the kernel) are packed
``[N/16, K/2, 16·2]`` dense or ``[nnzb, r, 2]`` in blocks. The int8 codes come from lowering
(``passes.quant_ops``): packing here is only a relayout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from tilefx.errors import LoweringError

__all__ = [
    "BsrWeight",
    "NarrowWeight",
    "pack_bf16_bsr",
    "pack_bf16_dense",
    "pack_bsr",
    "pack_int8_bsr",
    "pack_int8_dense",
    "pattern_hash",
]


@dataclass(frozen=True, eq=False)
class BsrWeight:
    """A weight matrix ``[n, k]`` in BSR form, blocks ``(r, c)`` stored transposed."""

    data: torch.Tensor  # float32 [nnzb, c, r]
    indices: torch.Tensor  # int32 [nnzb], block column of each stored block
    indptr: torch.Tensor  # int32 [n / r + 1]
    shape: tuple[int, int]
    block: tuple[int, int]

    @property
    def nnzb(self) -> int:
        """Stored blocks (an all-zero weight still keeps one zero block so buffers are non-empty)."""
        return int(self.indptr[-1])

    def to_dense(self) -> torch.Tensor:
        """The dense matrix back (for tests and debugging)."""
        r, c = self.block
        n, k = self.shape
        out = torch.zeros(n // r, r, k // c, c, dtype=self.data.dtype)
        rows = torch.repeat_interleave(torch.arange(n // r), (self.indptr[1:] - self.indptr[:-1]).long())
        out[rows, :, self.indices[: self.nnzb].long(), :] = self.data[: self.nnzb].transpose(1, 2)
        return out.reshape(n, k)


def pattern_hash(mask: torch.Tensor) -> str:
    """A short, stable digest of a block mask: kernels with equal masks are interchangeable."""
    bits = np.packbits(mask.detach().to(torch.bool).cpu().numpy())
    return hashlib.sha1(bits.tobytes() + str(tuple(mask.shape)).encode()).hexdigest()[:16]


def _block_rows(
    tiles: torch.Tensor, mask: torch.Tensor, rows_of_blocks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(data, indices, indptr) of the blocks ``mask`` keeps, ``tiles[block row, block col, ...]``,
    row-major (by block row, then column); one zero block when none is kept."""
    rows, cols = mask.nonzero(as_tuple=True)
    indptr = torch.zeros(rows_of_blocks + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(mask.sum(dim=1), 0).to(torch.int32)
    data, indices = tiles[rows, cols].contiguous(), cols.to(torch.int32).contiguous()
    if indices.numel() == 0:  # zero-size buffers are not compact arrays to TVM; indptr keeps it unread
        data = torch.zeros((1, *tiles.shape[2:]), dtype=tiles.dtype)
        indices = torch.zeros(1, dtype=torch.int32)
    return data, indices, indptr


def _check_mask(matrix: torch.Tensor, block: tuple[int, int], mask: torch.Tensor) -> torch.Tensor:
    """``mask`` on the CPU as bool, after checking it fits the block grid and holds every nonzero."""
    (n, k), (r, c) = matrix.shape, block
    if r <= 0 or c <= 0 or n % r or k % c:
        raise LoweringError(f"block {block} does not tile the weight's matrix view {(n, k)}")
    mask = mask.to(torch.bool).cpu()
    if tuple(mask.shape) != (n // r, k // c):
        raise LoweringError(
            f"block mask {tuple(mask.shape)} does not match the block grid {(n // r, k // c)}"
        )
    nonzero = matrix.reshape(n // r, r, k // c, c).ne(0).any(dim=3).any(dim=1)
    if bool((nonzero & ~mask).any()):
        raise LoweringError(
            "weight has nonzeros in blocks its BlockSparsity mask drops; apply the masks first"
        )
    return mask


def pack_bsr(weight: torch.Tensor, block: tuple[int, int], mask: torch.Tensor | None = None) -> BsrWeight:
    """Pack ``weight`` (any shape; its matrix view ``[out, -1]`` is used) into BSR.

    ``mask[i, j]`` True keeps block (i, j) even if it happens to be all zeros, so the stored
    pattern equals the pruner's record; without a mask, blocks that hold a nonzero are kept.
    Requires: float32 weight; ``block`` tiles the matrix view; a mask of the block grid's shape.
    Raises ``LoweringError`` otherwise, and if a dropped block holds nonzeros (the weight and
    its metadata disagree, so the kernel would silently compute something else).
    """
    if weight.dtype != torch.float32:
        raise LoweringError(f"BSR packing supports float32 weights, got {weight.dtype}")
    matrix = weight.detach().reshape(weight.shape[0], -1).cpu()
    (n, k), (r, c) = matrix.shape, block
    if r <= 0 or c <= 0 or n % r or k % c:
        raise LoweringError(f"block {block} does not tile the weight's matrix view {(n, k)}")
    if mask is None:
        mask = matrix.reshape(n // r, r, k // c, c).ne(0).any(dim=3).any(dim=1)
    mask = _check_mask(matrix, block, mask)
    tiles = matrix.reshape(n // r, r, k // c, c).permute(0, 2, 3, 1)  # [nb, kb, c, r]
    data, indices, indptr = _block_rows(tiles, mask, n // r)
    return BsrWeight(
        data=data,
        indices=indices,
        indptr=indptr,
        shape=(n, k),
        block=(r, c),
    )


@dataclass(frozen=True, eq=False)
class NarrowWeight:
    """A linear weight ``[n, k]`` packed for an int8 or bf16 kernel.

    ``arrays`` are the kernel's arguments between X and the bias, in order: int8 BSR
    ``(data [nnzb, r, 4] s8, indices, indptr, sw [n] f32, cs [n] i32, aq [2] f32)``, int8 dense
    ``(panels [n/16, k/4, 16, 4] s8, sw, cs, aq)``, bf16 BSR ``(data [nnzb, r, 2] f32, indices,
    indptr)``, bf16 dense ``(panels [n/16, k/2, 32] f32,)``.
    """

    arrays: tuple[torch.Tensor, ...]
    shape: tuple[int, int]
    number_format: str  # "int8" or "bf16"
    layout: str  # "bsr" or "dense"
    block: tuple[int, int]
    nnzb: int


def _int8_tail(
    codes: torch.Tensor, scales: torch.Tensor, grid: tuple[float, int] | None
) -> tuple[torch.Tensor, ...]:
    """``(sw, cs, aq)``: scales, column sums of the codes, the static grid (zeros when dynamic)."""
    if codes.dtype != torch.int8 or scales.shape != (codes.shape[0],):
        raise LoweringError(
            f"int8 packing takes int8 codes [n, k] and fp32 scales [n], got {codes.dtype} {tuple(scales.shape)}"
        )
    sums = codes.to(torch.int32).sum(dim=1).to(torch.int32).contiguous()
    aq = torch.tensor([grid[0], float(grid[1])] if grid is not None else [0.0, 0.0], dtype=torch.float32)
    return scales.detach().float().cpu().contiguous(), sums, aq


def pack_int8_dense(
    codes: torch.Tensor, scales: torch.Tensor, grid: tuple[float, int] | None
) -> NarrowWeight:
    """int8 codes ``[n, k]`` in VNNI panels; ``grid``: the static activation (scale, zero point)."""
    n, k = codes.shape
    if n % 16 or k % 4:
        raise LoweringError(f"dense int8 panels need out % 16 == 0 and in % 4 == 0, got {(n, k)}")
    panels = codes.cpu().reshape(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3).contiguous()
    tail = _int8_tail(codes.cpu(), scales, grid)
    return NarrowWeight((panels, *tail), (n, k), "int8", "dense", (16, 4), (n // 16) * (k // 4))


def pack_int8_bsr(
    codes: torch.Tensor,
    scales: torch.Tensor,
    block: tuple[int, int],
    mask: torch.Tensor,
    grid: tuple[float, int] | None,
) -> NarrowWeight:
    """int8 codes ``[n, k]`` as row-major ``(r, 4)`` blocks kept where ``mask`` says."""
    codes = codes.cpu()
    (n, k), (r, c) = codes.shape, block
    if c != 4:
        raise LoweringError(f"int8 blocks span 4 input columns (one VNNI word), got {block}")
    mask = _check_mask(codes, block, mask)
    tiles = codes.reshape(n // r, r, k // 4, 4).permute(0, 2, 1, 3)  # [nb, kb, r, 4]
    data, indices, indptr = _block_rows(tiles, mask, n // r)
    tail = _int8_tail(codes, scales, grid)
    return NarrowWeight((data, indices, indptr, *tail), (n, k), "int8", "bsr", block, int(indptr[-1]))


def pack_bf16_dense(weight: torch.Tensor) -> NarrowWeight:
    """A bf16-rounded fp32 weight ``[n, k]`` as ``[n/16, k/2, 32]``: per 16 outputs and k pair, one zmm pair."""
    w = weight.detach().float().cpu()
    n, k = w.shape
    if n % 16 or k % 2:
        raise LoweringError(f"dense bf16 panels need out % 16 == 0 and in % 2 == 0, got {(n, k)}")
    panels = w.reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).reshape(n // 16, k // 2, 32).contiguous()
    return NarrowWeight((panels,), (n, k), "bf16", "dense", (16, 2), (n // 16) * (k // 2))


def pack_bf16_bsr(weight: torch.Tensor, block: tuple[int, int], mask: torch.Tensor) -> NarrowWeight:
    """A bf16-rounded fp32 weight as row-major ``(r, 2)`` blocks (one k pair per ``vdpbf16ps``)."""
    w = weight.detach().float().cpu()
    (n, k), (r, c) = w.shape, block
    if c != 2:
        raise LoweringError(f"bf16 blocks span 2 input columns (one vdpbf16ps pair), got {block}")
    mask = _check_mask(w, block, mask)
    tiles = w.reshape(n // r, r, k // 2, 2).permute(0, 2, 1, 3)  # [nb, kb, r, 2]
    data, indices, indptr = _block_rows(tiles, mask, n // r)
    return NarrowWeight((data, indices, indptr), (n, k), "bf16", "bsr", block, int(indptr[-1]))
