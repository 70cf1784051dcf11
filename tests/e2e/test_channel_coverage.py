"""Channel pruning runs, keeps output shapes and matches the masked model on every model family.

The full sweep over all torchvision classifiers (and Torch-Pruning beside it) lives in
benchmarks/channel_coverage.py; here one or two models per family keep the suite fast.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import tilefx
from tests.models import randomize_bn

FAMILIES = (
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "inception_v3",
    "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf",
    "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0", "swin_t", "swin_v2_t",
    "vgg11_bn", "vit_b_32",
)  # fmt: skip


#: Run on the same xdist worker as test_model_coverage's largest models, one at a time (memory).
HUGE = ("vgg11_bn", "vit_b_32")


def _side(name: str) -> int:
    return 224 if name.startswith(("vit_", "swin_", "maxvit_")) else 96 if name == "inception_v3" else 64


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "ratio"),
    [
        pytest.param(name, (0.3, 0.5)[i % 2], marks=[pytest.mark.xdist_group("huge")] if name in HUGE else [])
        for i, name in enumerate(FAMILIES)
    ],
)  # both ratios on every model: benchmarks/channel_coverage.py
def test_torchvision_family_prunes_and_shrinks(name: str, ratio: float) -> None:
    model = randomize_bn(torchvision.models.get_model(name, weights=None)).eval()
    x = torch.randn(1, 3, _side(name), _side(name))
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=ratio))
    pruned = tilefx.optimize(model, (x,), recipe=recipe)  # verified against the masked model inside
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in pruned.parameters()) < before * (1 - ratio / 3)


def _transformers() -> object:
    return pytest.importorskip("transformers")


def _bert() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    t = _transformers()
    config = t.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )  # type: ignore[attr-defined]
    ids = torch.randint(0, 100, (2, 9))
    return t.BertModel(config).eval(), (ids, torch.ones_like(ids))  # type: ignore[attr-defined]


def _gpt2() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    t = _transformers()
    config = t.GPT2Config(
        vocab_size=100, n_embd=64, n_layer=2, n_head=4, use_cache=False, bos_token_id=0, eos_token_id=0
    )  # type: ignore[attr-defined]
    return t.GPT2Model(config).eval(), (torch.randint(0, 100, (2, 9)),)  # type: ignore[attr-defined]


def _vit() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    t = _transformers()
    config = t.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
    )  # type: ignore[attr-defined]
    return t.ViTModel(config).eval(), (torch.randn(1, 3, 32, 32),)  # type: ignore[attr-defined]


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("build", [_bert, _gpt2, _vit], ids=["bert", "gpt2", "vit"])
def test_transformers_prune_mlp_and_head_dims(build: object, ratio: float) -> None:
    model, inputs = build()  # type: ignore[operator]
    pruned = tilefx.optimize(model, inputs, recipe=tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=ratio)))
    with torch.no_grad():
        assert pruned(*inputs)["last_hidden_state"].shape == model(*inputs).last_hidden_state.shape
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("build", [_bert, _gpt2, _vit], ids=["bert", "gpt2", "vit"])
def test_transformers_prune_whole_heads(build: object) -> None:
    model, inputs = build()  # type: ignore[operator]
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5, attention="heads"))
    pruned = tilefx.optimize(model, inputs, recipe=recipe)
    with torch.no_grad():
        assert pruned(*inputs)["last_hidden_state"].shape == model(*inputs).last_hidden_state.shape
