"""BSR packing: round trip, stored pattern equals the record, and validation errors."""

from __future__ import annotations

import pytest
import torch

from tilefx.errors import LoweringError
from tilefx.runtime.packing import pack_bsr, pattern_hash


@pytest.mark.parametrize("block", [(1, 1), (4, 4), (16, 1), (1, 16), (2, 8)])
def test_round_trip(block: tuple[int, int]) -> None:
    r, c = block
    mask = torch.rand(32 // r, 48 // c) < 0.5
    weight = torch.randn(32, 48) * mask.repeat_interleave(r, 0).repeat_interleave(c, 1)
    packed = pack_bsr(weight, block, mask)
    assert packed.nnzb == int(mask.sum())
    assert packed.data.shape[1:] == (c, r)  # blocks stored transposed
    torch.testing.assert_close(packed.to_dense(), weight)


def test_conv_weight_uses_its_matrix_view() -> None:
    weight = torch.randn(8, 2, 3, 3)
    packed = pack_bsr(weight, (2, 9))
    assert packed.shape == (8, 18) and packed.nnzb == 8
    torch.testing.assert_close(packed.to_dense(), weight.reshape(8, 18))


def test_kept_zero_block_stays_stored() -> None:
    mask = torch.ones(2, 2, dtype=torch.bool)
    packed = pack_bsr(torch.zeros(4, 4), (2, 2), mask)
    assert packed.nnzb == 4


def test_empty_weight_keeps_non_empty_buffers() -> None:
    packed = pack_bsr(torch.zeros(4, 4), (2, 2), torch.zeros(2, 2, dtype=torch.bool))
    assert packed.nnzb == 0 and packed.data.shape[0] == 1
    assert packed.indptr.tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    ("weight", "block", "mask", "match"),
    [
        (torch.zeros(4, 4, dtype=torch.float64), (2, 2), None, "float32"),
        (torch.zeros(6, 4), (4, 2), None, "does not tile"),
        (torch.zeros(4, 4), (2, 2), torch.ones(3, 2, dtype=torch.bool), "does not match the block grid"),
        (torch.ones(4, 4), (2, 2), torch.eye(2, dtype=torch.bool), "apply the masks"),
    ],
)
def test_bad_input_raises(
    weight: torch.Tensor, block: tuple[int, int], mask: torch.Tensor | None, match: str
) -> None:
    with pytest.raises(LoweringError, match=match):
        pack_bsr(weight, block, mask)


def test_pattern_hash_depends_only_on_the_pattern() -> None:
    a = torch.tensor([[True, False], [False, True]])
    assert pattern_hash(a) == pattern_hash(a.clone())
    assert pattern_hash(a) != pattern_hash(~a)
