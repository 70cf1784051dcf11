"""T5, BART, GPT-2 and Whisper encoders from small configs: block recipe and channel recipe both run.

Before issue 16 GPT-2 had 0 of 8 weights block-sparse (``Conv1D`` is ``addmm``) and T5 stopped
on ``full_like`` with no channel handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers
from transformers.models.whisper.modeling_whisper import WhisperEncoder

import tilefx
from tilefx import BlockPruning, ChannelPruning, Recipe
from tilefx.lowering.plan import plan_graph
from tilefx.passes.analysis.weight_layers import weight_layers
from tilefx.passes.metadata import BlockSparsity, get_metadata

IDS = (torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0)),)


def t5() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    config = transformers.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    return transformers.T5EncoderModel(config), IDS


def bart() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    config = transformers.BartConfig(
        vocab_size=100, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        use_cache=False,
    )  # fmt: skip
    return transformers.BartModel(config), IDS


def gpt2() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    config = transformers.GPT2Config(
        vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False
    )
    return transformers.GPT2Model(config), IDS


def whisper() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    config = transformers.WhisperConfig(
        d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=16,
        max_source_positions=32,
    )  # fmt: skip
    return WhisperEncoder(config), (torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0)),)


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, tuple[Any, ...]]]] = {
    "t5": t5, "bart": bart, "gpt2": gpt2, "whisper": whisper,
}  # fmt: skip


@pytest.mark.parametrize("name", list(MODELS))
def test_block_recipe_prunes_every_dividing_weight_and_plans_it(name: str) -> None:
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    recipe = Recipe(blocks=BlockPruning(block=(16, 1), sparsity=0.8, reorder="tetris"))
    gm = tilefx.optimize(model.eval(), inputs, recipe)  # verified
    layers = weight_layers(gm, matmul_weights=True)
    sparse = [layer for layer in layers if get_metadata(gm).of(layer.param, BlockSparsity)]
    dividing = [layer for layer in layers if layer.out_channels % 16 == 0]
    assert sparse and sparse == dividing
    planned = {layer.weight for layer in plan_graph(gm).layers}
    assert {layer.param for layer in sparse if layer.kind == "linear"} <= planned


@pytest.mark.parametrize("name", list(MODELS))
def test_channel_recipe_prunes(name: str) -> None:
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    gm = tilefx.optimize(model.eval(), inputs, Recipe(channels=ChannelPruning(ratio=0.3)))  # verified
    assert sum(p.numel() for p in gm.parameters()) < sum(p.numel() for p in model.parameters())
