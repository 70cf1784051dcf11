"""DetectBlocksPass: the largest candidate block whose zeros tile the weight, or nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tilefx
from tilefx.errors import RecipeError
from tilefx.passes.analysis.detect_blocks import CANDIDATES, DetectBlocksPass, has_sparsity_records
from tilefx.passes.metadata import BlockSparsity, ElementMask, get_metadata, set_metadata


def _blocked(shape: tuple[int, int], block: tuple[int, int], sparsity: float, seed: int = 0) -> torch.Tensor:
    """A random weight with exactly ``sparsity`` of its ``block``-blocks zeroed."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape[0] // block[0], shape[1] // block[1]
    order = torch.randperm(rows * cols, generator=gen)
    keep = torch.ones(rows * cols, dtype=torch.bool)
    keep[order[: round(sparsity * rows * cols)]] = False
    mask = keep.reshape(rows, cols).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return (torch.randn(shape, generator=gen) + 3.0) * mask  # +3: no incidental zero in kept blocks


def _linear_graph(weight: torch.Tensor) -> torch.fx.GraphModule:
    model = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        model.weight.copy_(weight)
    return tilefx.capture(model, (torch.randn(2, weight.shape[1]),))


@pytest.mark.parametrize(
    ("block", "sparsity"),
    [((16, 1), 0.8), ((1, 16), 0.5), ((8, 8), 0.75), ((32, 32), 0.5), ((4, 1), 0.9), ((16, 16), 0.25)],
)
def test_detection_picks_the_block_and_sparsity_that_made_the_zeros(
    block: tuple[int, int], sparsity: float
) -> None:
    gm = _linear_graph(_blocked((64, 128), block, sparsity))
    result = DetectBlocksPass()(gm)
    assert result.modified
    (record,) = get_metadata(gm).of("weight", BlockSparsity)
    assert record.block == block
    assert record.sparsity == pytest.approx(sparsity, abs=0.005)  # rounded to whole blocks
    expected = gm.get_parameter("weight").ne(0)
    assert torch.equal(record.element_mask(gm.get_parameter("weight").shape), expected)


def test_conv_blocks_span_the_kernel() -> None:
    conv = nn.Conv2d(8, 32, 3, padding=1)
    with torch.no_grad():
        matrix = _blocked((32, 8), (16, 1), 0.5)  # channel blocks, then spread over the 3x3 kernel
        conv.weight.copy_(matrix[:, :, None, None].expand(32, 8, 3, 3))
    gm = tilefx.capture(conv, (torch.randn(1, 8, 6, 6),))
    DetectBlocksPass()(gm)
    (record,) = get_metadata(gm).of("weight", BlockSparsity)
    assert record.block == (16, 9)  # 16 output channels x (1 input channel x 3 x 3)
    assert record.sparsity == pytest.approx(0.5)


def test_dense_and_unstructured_weights_get_no_record() -> None:
    dense = _linear_graph(torch.randn(64, 64) + 3.0)
    gen = torch.Generator().manual_seed(1)
    unstructured = _linear_graph((torch.randn(64, 64) + 3.0) * (torch.rand(64, 64, generator=gen) > 0.5))
    for gm in (dense, unstructured):
        assert not DetectBlocksPass()(gm).modified
        assert not has_sparsity_records(gm)


def test_a_stray_zero_in_a_kept_block_is_tolerated() -> None:
    weight = _blocked((64, 64), (16, 1), 0.75)
    row, col = torch.nonzero(weight)[0].tolist()
    weight[row, col] = 0.0  # one incidental zero among 768 block zeros (under stray=1%)
    gm = _linear_graph(weight)
    DetectBlocksPass()(gm)
    (record,) = get_metadata(gm).of("weight", BlockSparsity)
    assert record.block == (16, 1)
    assert not DetectBlocksPass(stray=0.0)(_linear_graph(weight)).modified  # exact: no block fits


def test_an_existing_sparsity_record_is_kept_and_rerunning_changes_nothing() -> None:
    weight = _blocked((64, 64), (16, 1), 0.5)
    gm = _linear_graph(weight)
    mask = ElementMask(weight.ne(0))
    set_metadata(gm, get_metadata(gm).with_annotation("weight", mask))
    assert not DetectBlocksPass()(gm).modified
    assert get_metadata(gm).params["weight"] == (mask,)
    fresh = _linear_graph(weight)
    assert DetectBlocksPass()(fresh).modified
    assert not DetectBlocksPass()(fresh).modified


def test_candidates_are_largest_first_and_bad_options_are_recipe_errors() -> None:
    areas = [rows * cols for rows, cols in CANDIDATES]
    assert areas == sorted(areas, reverse=True)
    with pytest.raises(RecipeError, match="candidates"):
        DetectBlocksPass(candidates=((0, 4),))
    with pytest.raises(RecipeError, match="stray"):
        DetectBlocksPass(stray=1.5)
