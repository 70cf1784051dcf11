"""Shared helpers for the lowering tests: block-sparse weights with the edge cases kernels get wrong."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

BlockSparseFactory = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def block_sparse(
    n: int, k: int, block: tuple[int, int], density: float = 0.4, *, ragged: bool = True, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [n, k] and its block mask; ``ragged`` forces an empty and a full block row."""
    r, c = block
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n // r, k // c, generator=gen) < density
    if ragged and mask.shape[0] >= 3:
        mask[0] = False  # empty block row: the ragged loop runs zero times
        mask[1] = True  # fully dense block row
    full = mask.repeat_interleave(r, 0).repeat_interleave(c, 1)
    return torch.randn(n, k, generator=gen) * full, mask


def single_block(n: int, k: int, block: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly one stored block, in the last block row (so every earlier row is empty)."""
    r, c = block
    mask = torch.zeros(n // r, k // c, dtype=torch.bool)
    mask[-1, (k // c) // 2] = True
    full = mask.repeat_interleave(r, 0).repeat_interleave(c, 1)
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * full, mask


@pytest.fixture(scope="session")
def llvm_target():  # type: ignore[no-untyped-def]
    from tilefx.lowering import compat

    return compat.make_target("llvm")


@pytest.fixture(scope="session")
def make_block_sparse() -> BlockSparseFactory:
    return block_sparse


@pytest.fixture(scope="session")
def make_single_block() -> BlockSparseFactory:
    return single_block
