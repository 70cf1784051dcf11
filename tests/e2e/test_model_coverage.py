"""Capture + BN folding are exact on every torchvision classifier and on transformers encoders."""

from __future__ import annotations

import pytest
import torch
import torchvision

import tilefx
from tests.models import randomize_bn
from tilefx.report import max_relative_error

TORCHVISION = torchvision.models.list_models(module=torchvision.models)
#: The largest models (86M–644M parameters) share one xdist worker, one at a time: bounds peak memory.
HUGE = ("regnet_y_128gf", "regnet_y_32gf", "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32")
HUGE += tuple(n for n in TORCHVISION if n.startswith("vgg"))
NEEDS_224 = ("vit_", "swin_", "maxvit_")  # fixed image size or window arithmetic


def _input_for(name: str) -> torch.Tensor:
    side = (
        224 if name.startswith(NEEDS_224) else 96 if name == "inception_v3" else 64
    )  # inception needs >= 75
    return torch.randn(1, 3, side, side)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.xdist_group("huge")) if n in HUGE else n for n in TORCHVISION]
)
def test_torchvision_classifier_captures_and_folds_exactly(name: str) -> None:
    model = randomize_bn(torchvision.models.get_model(name, weights=None)).eval()
    x = _input_for(name)
    optimized = tilefx.optimize(model, (x,))
    with torch.no_grad():
        assert max_relative_error(optimized(x), model(x)) <= 1e-5
    folded = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    remaining = sum(n.target == torch.ops.aten.batch_norm.default for n in optimized.graph.nodes)
    assert remaining <= folded


def test_every_torchvision_classifier_is_in_the_sweep() -> None:
    assert len(TORCHVISION) >= 80  # guards against list_models silently returning less


def _bert(**overrides: int) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=500,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        **overrides,
    )
    return transformers.BertModel(config).eval()


def test_bert_from_config_captures_exactly() -> None:
    model = _bert()
    ids = torch.randint(0, 500, (2, 12))
    mask = torch.ones_like(ids)
    optimized = tilefx.optimize(model, (ids, mask))
    with torch.no_grad():
        expected = model(ids, mask).last_hidden_state
        assert max_relative_error(optimized(ids, mask)["last_hidden_state"], expected) <= 1e-5
    assert any(n.target == torch.ops.aten.scaled_dot_product_attention.default for n in optimized.graph.nodes)


def test_minilm_real_weights_capture_exactly() -> None:
    zoo = pytest.importorskip("tilefx.zoo")
    pytest.importorskip("all_minilm_l6_v2")
    minilm = zoo.load_minilm()
    encoded = minilm.encode()
    inputs = (encoded["input_ids"], encoded["attention_mask"])
    optimized = tilefx.optimize(minilm.model, inputs)
    with torch.no_grad():
        expected = minilm.model(*inputs).last_hidden_state
        assert max_relative_error(optimized(*inputs)["last_hidden_state"], expected) <= 1e-5
