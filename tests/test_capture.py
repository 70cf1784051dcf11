"""Capture: one IR from any model, typed errors for what torch.export cannot take."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.models import ConvBN
from tilefx import CaptureError, capture


def test_captures_module_as_aten_graph_with_own_tensors() -> None:
    model = ConvBN().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = capture(model, (x,))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.conv2d.default in targets
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    assert gm.get_parameter("conv.weight") is not model.conv.weight
    torch.testing.assert_close(gm(x), model(x))


def test_accepts_symbolic_trace_and_export_graphs() -> None:
    model = ConvBN().eval()
    x = torch.randn(1, 3, 8, 8)
    for source in (torch.fx.symbolic_trace(model), torch.export.export(model, (x,)).module()):
        gm = capture(source, (x,))
        assert all(n.op != "call_module" for n in gm.graph.nodes)
        torch.testing.assert_close(gm(x), model(x))


def test_training_model_is_captured_in_eval_mode_and_its_mode_restored() -> None:
    model = ConvBN().train()
    model.bn.eval()  # a mixed-mode model keeps its exact per-module flags
    x = torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,))
    assert model.training and not model.bn.training and model.conv.training
    torch.testing.assert_close(gm(x), ConvBN.forward(model.eval(), x))


def test_data_dependent_control_flow_is_a_typed_error_naming_model_and_fix() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return x * 2
            return x

    with pytest.raises(CaptureError) as info:
        capture(Branchy(), (torch.randn(3),))
    message = str(info.value)
    assert "Branchy" in message and "data-dependent" in message and "torch.cond" in message
    assert "test_capture.py" in message  # points at the user's line


def test_bad_example_inputs_and_non_modules() -> None:
    with pytest.raises(CaptureError, match="example_inputs"):
        capture(ConvBN(), {"x": torch.randn(1)})  # type: ignore[arg-type]
    with pytest.raises(CaptureError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(1),))  # type: ignore[arg-type]


def test_wrong_input_shape_is_a_capture_error() -> None:
    with pytest.raises(CaptureError, match="ConvBN"):
        capture(ConvBN(), (torch.randn(1, 5, 8, 8),))
