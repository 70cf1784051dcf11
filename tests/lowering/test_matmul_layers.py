"""Linears written as ``addmm`` / ``mm`` / ``matmul`` with a parameter operand: pruned and lowered like ``linear``.

GPT-2's transformers ``Conv1D`` exports as ``addmm(bias, x.view(-1, in), W)`` with W stored
``[in, out]``; a hand-written ``x @ W.T`` reads a ``[out, in]`` parameter through ``numpy_T``.
"""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import tilefx
from tilefx import BlockPruning, ChannelPruning, Recipe
from tilefx.lowering.plan import plan_graph
from tilefx.passes.analysis.weight_layers import weight_layers
from tilefx.passes.metadata import BlockSparsity, get_metadata
from tilefx.runtime.sparse_modules import BsrLinear


class Conv1DBlock(torch.nn.Module):
    """A GPT-2-like MLP: two transformers ``Conv1D`` layers (weights stored [in, out])."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = Conv1D(64, 32)
        self.proj = Conv1D(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.fc(x)))


class HandWritten(torch.nn.Module):
    """``x @ W.T`` and ``x.mm(W.t())`` with ``[out, in]`` parameters, and ``x @ V`` with V ``[in, out]``."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(64, 32) / 6)
        self.w2 = torch.nn.Parameter(torch.randn(32, 64) / 8)
        self.v = torch.nn.Parameter(torch.randn(32, 48) / 6)
        self.b = torch.nn.Parameter(torch.randn(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ self.w1.T)
        y = h.reshape(-1, 64).mm(self.w2.t()).reshape(x.shape[:-1] + (32,)) + self.b
        return y @ self.v


BLOCKS = Recipe(blocks=BlockPruning(block=(16, 1), sparsity=0.8, reorder="none"))


def _x() -> torch.Tensor:
    return torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model", [Conv1DBlock, HandWritten])
@pytest.mark.parametrize("reorder", ["none", "tetris"])
def test_matmul_linears_are_block_pruned_and_verified(model: type[torch.nn.Module], reorder: str) -> None:
    torch.manual_seed(0)
    recipe = Recipe(blocks=BlockPruning(block=(16, 1), sparsity=0.8, reorder=reorder))  # type: ignore[arg-type]
    gm = tilefx.optimize(model(), (_x(),), recipe)  # verification (masked) runs inside
    layers = weight_layers(gm, matmul_weights=True)
    assert layers and all(get_metadata(gm).of(layer.param, BlockSparsity) for layer in layers)
    for layer in layers:
        record = get_metadata(gm).of(layer.param, BlockSparsity)[-1]
        assert record.block == ((1, 16) if layer.transposed else (16, 1))  # stated on the stored view
        assert record.sparsity == pytest.approx(0.8, abs=0.07)


def test_conv1d_records_are_on_the_stored_in_out_view() -> None:
    torch.manual_seed(0)
    gm = tilefx.optimize(Conv1DBlock(), (_x(),), BLOCKS)
    record = get_metadata(gm).of("fc.weight", BlockSparsity)[-1]
    weight = gm.get_parameter("fc.weight")
    assert tuple(weight.shape) == (32, 64) and tuple(record.mask.shape) == (32, 4)
    assert not bool(weight.detach()[~record.element_mask(weight.shape)].any())
    planned = plan_graph(gm).layers
    assert [(layer.op, layer.block, layer.weight_transposed) for layer in planned] == [
        ("linear", (16, 1), True),
        ("linear", (16, 1), True),
    ]
    assert tuple(planned[0].sparsity.mask.shape) == (4, 32)  # [out / 16, in]


def test_plan_leaves_unannotated_matmuls_and_activation_products_alone() -> None:
    class Attention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return q @ k.transpose(-1, -2)

    gm = torch.export.export(Attention(), (torch.randn(2, 4, 8), torch.randn(2, 4, 8))).module()
    assert plan_graph(gm).layers == ()
    assert weight_layers(gm, matmul_weights=True) == []


def test_connection_and_other_passes_do_not_see_matmul_weights_unless_asked() -> None:
    gm = torch.export.export(Conv1DBlock(), (_x(),)).module()
    assert weight_layers(gm) == []
    assert [layer.param for layer in weight_layers(gm, matmul_weights=True)] == ["fc.weight", "proj.weight"]


def test_channel_pruning_shrinks_conv1d_and_transposed_weights() -> None:
    torch.manual_seed(0)
    for model in (Conv1DBlock(), HandWritten()):
        gm = tilefx.optimize(model, (_x(),), Recipe(channels=ChannelPruning(ratio=0.5, round_to=16)))
        shrunk = [name for name, p in gm.named_parameters() if 32 in p.shape and p.numel() < 64 * 32]
        assert shrunk, dict(gm.named_parameters())


@pytest.mark.parametrize("model", [Conv1DBlock, HandWritten])
def test_compiled_matmul_linears_match_the_pruned_model(model: type[torch.nn.Module]) -> None:
    torch.manual_seed(0)
    gm = tilefx.optimize(model(), (_x(),), BLOCKS)
    compiled = tilefx.compile(gm, fallback="never")
    kernels = [m for m in compiled.modules() if isinstance(m, BsrLinear)]
    assert len(kernels) == len(weight_layers(gm, matmul_weights=True))
    x = _x()
    torch.testing.assert_close(compiled(x), gm(x), atol=1e-4, rtol=1e-4)
