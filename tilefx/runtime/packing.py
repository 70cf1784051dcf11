"""Masked dense weights → BSR arrays (data, indices, indptr), validated.

The passes hand over a plain weight whose dropped blocks are zero plus a ``BlockSparsity``
record; reordering permutations are already folded into the weight, so packing is a pure
relayout with no gathers at run time. Blocks are stored *transposed* (``data[nnzb, c, r]``)
because every kernel reads the ``r`` output features of one block column together.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from tilefx.errors import LoweringError

__all__ = ["BsrWeight", "pack_bsr", "pattern_hash"]


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
    tiles = matrix.reshape(n // r, r, k // c, c).permute(0, 2, 3, 1)  # [nb, kb, c, r]
    nonzero = tiles.ne(0).any(dim=3).any(dim=2)
    if mask is None:
        mask = nonzero
    mask = mask.to(torch.bool).cpu()
    if tuple(mask.shape) != (n // r, k // c):
        raise LoweringError(
            f"block mask {tuple(mask.shape)} does not match the block grid {(n // r, k // c)}"
        )
    if bool((nonzero & ~mask).any()):
        raise LoweringError(
            "weight has nonzeros in blocks its BlockSparsity mask drops; apply the masks first"
        )
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: sorted by block row, then column
    indptr = torch.zeros(n // r + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(mask.sum(dim=1), 0).to(torch.int32)
    data, indices = tiles[rows, cols].contiguous(), cols.to(torch.int32).contiguous()
    if indices.numel() == 0:  # zero-size buffers are not compact arrays to TVM; indptr keeps it unread
        data, indices = torch.zeros(1, c, r), torch.zeros(1, dtype=torch.int32)
    return BsrWeight(
        data=data,
        indices=indices,
        indptr=indptr,
        shape=(n, k),
        block=(r, c),
    )
