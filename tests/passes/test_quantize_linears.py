"""QuantizeLinearsPass: the graph it writes, its numbers against the reference quantizers, its contract."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilefx
from tilefx.passes import quant_ops as Q
from tilefx.passes.metadata import BlockSparsity, Quantized, get_metadata
from tilefx.passes.quantize_linears import Quantization, QuantizeLinearsPass
from tilefx.passes.training.calibration import Calibration
from tilefx.report import quantization_summary

aten, tfx = torch.ops.aten, torch.ops.tilefx
X = torch.randn(24, 64)


class FFN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def _optimize(quantize: Quantization, calibration: object = None, **recipe: object) -> torch.fx.GraphModule:
    return tilefx.optimize(FFN().eval(), (X,), tilefx.Recipe(quantize=quantize, **recipe), calibration)  # type: ignore[arg-type]


def _ops(gm: torch.fx.GraphModule) -> list[object]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_int8_graph_is_fake_quant_before_every_linear() -> None:
    gm = _optimize(Quantization())
    assert _ops(gm) == [
        tfx.fake_quant_rows.default,
        aten.linear.default,
        aten.gelu.default,
        tfx.fake_quant_rows.default,
        aten.linear.default,
    ]


def test_int8_numbers_equal_the_reference_by_hand() -> None:
    model = FFN().eval()
    gm = tilefx.optimize(model, (X,), tilefx.Recipe(quantize=Quantization()))
    up, down = Q.quantize_weight(model.up.weight), Q.quantize_weight(model.down.weight)
    hidden = F.gelu(F.linear(Q.fake_quant_rows_ref(X), up.dequantized(), model.up.bias))
    expected = F.linear(Q.fake_quant_rows_ref(hidden), down.dequantized(), model.down.bias)
    torch.testing.assert_close(gm(X), expected, rtol=0, atol=1e-5)
    record = get_metadata(gm).of("up.weight", Quantized)[-1]
    assert record.format == "int8" and record.scheme == "dynamic"
    assert torch.equal(record.weight_scales, up.scales)  # type: ignore[arg-type]
    assert torch.equal(gm.get_parameter("up.weight"), up.dequantized())  # the kernel's grid exactly


def test_fake_quant_rows_is_bit_exact_with_the_reference_codes() -> None:
    x = torch.cat([torch.randn(5, 32) * 1e4, torch.zeros(2, 32), F.gelu(torch.randn(5, 32) * 3)])
    u, sx, zx = Q.quantize_rows(x)
    assert torch.equal(tfx.fake_quant_rows(x), sx[:, None] * (u.float() - zx.float()[:, None]))
    assert bool((tfx.fake_quant_rows(torch.zeros(3, 16)) == 0).all())


def test_per_tensor_weights_share_one_scale() -> None:
    gm = _optimize(Quantization(per_channel=False))
    scales = get_metadata(gm).of("up.weight", Quantized)[-1].weight_scales
    assert scales is not None and bool((scales == scales[0]).all())


def test_block_zeros_survive_quantization() -> None:
    gm = _optimize(Quantization(), blocks=tilefx.BlockPruning(block=(16, 4), sparsity=0.75, reorder="none"))
    for name in ("up.weight", "down.weight"):
        blocks = get_metadata(gm).of(name, BlockSparsity)[-1]
        weight = gm.get_parameter(name)
        assert bool((weight[~blocks.element_mask(weight.shape)] == 0).all())
        assert get_metadata(gm).of(name, Quantized)


def test_keep_leaves_a_module_fp32() -> None:
    gm = _optimize(Quantization(keep=("down",)))
    assert not get_metadata(gm).of("down.weight", Quantized)
    assert _ops(gm).count(tfx.fake_quant_rows.default) == 1


def test_bf16_rounds_weights_and_inputs() -> None:
    gm = _optimize(Quantization(format="bf16"))
    assert _ops(gm).count(tfx.round_bf16.default) == 2
    weight = gm.get_parameter("up.weight")
    assert torch.equal(weight, weight.bfloat16().float())


def test_static_scheme_uses_the_calibration_range() -> None:
    batches = [(X * 2, None), (X - 1, None)]
    gm = _optimize(Quantization(scheme="static"), calibration=batches)
    record = get_metadata(gm).of("up.weight", Quantized)[-1]
    low = min(float((X * 2).min()), float((X - 1).min()))
    high = max(float((X * 2).max()), float((X - 1).max()))
    assert (record.act_scale, record.act_zero_point) == Q.static_params(low, high)
    fake = next(n for n in gm.graph.nodes if n.target == tfx.fake_quant_tensor.default)
    assert tuple(fake.args[1:]) == (record.act_scale, record.act_zero_point)


def test_second_run_changes_nothing_and_output_is_exportable() -> None:
    gm = _optimize(Quantization())
    assert not QuantizeLinearsPass(Quantization())(gm, example_inputs=(X,)).modified
    program = torch.export.export(gm, (X,))
    targets = {n.target for n in program.graph.nodes}
    assert tfx.fake_quant_rows.default in targets


class Sensitive(nn.Module):
    """``first`` reads an input with one huge feature it ignores: a per-row int8 grid spans the
    outlier, so every feature that matters rounds to zero. ``second`` quantizes harmlessly."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(64, 64)
        self.second = nn.Linear(64, 16)
        with torch.no_grad():
            self.first.weight[:, 0] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def test_fallback_returns_the_sensitive_layer_to_fp32(caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(16, 64)
    x[:, 0] = 1e4
    model = Sensitive().eval()
    recipe = tilefx.Recipe(quantize=Quantization(tolerance=0.02))
    with caplog.at_level(logging.INFO, logger="tilefx.passes.quantize_linears"):
        gm = tilefx.optimize(model, (x,), recipe, calibration=Calibration([(x, None)]))
    metadata = get_metadata(gm)
    assert not metadata.of("first.weight", Quantized)
    assert metadata.of("second.weight", Quantized)
    costs = {c.param: c for c in metadata.quantization}
    assert costs["first.weight"].cost > 0.02 > costs["second.weight"].cost
    assert not costs["first.weight"].quantized and costs["second.weight"].quantized
    with torch.no_grad():
        error = float((gm(x) - model(x)).norm() / model(x).norm())
    assert error <= 0.02
    assert "first.weight (cost" in caplog.text
    summary = quantization_summary(gm)
    assert summary is not None and "returned to fp32 by the tolerance: first.weight (cost" in summary
