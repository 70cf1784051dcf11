"""FoldBatchNormPass: golden graph, numerics, contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.models import ConvBN, LinearBN, SharedProducer, randomize_bn
from tilefx.errors import PreconditionError
from tilefx.graph_capture import capture
from tilefx.passes.cleanup import EliminateDeadCodePass
from tilefx.passes.fold_batchnorm import FoldBatchNormPass
from tilefx.passes.infra import PassManager

aten = torch.ops.aten


def _targets(gm: torch.fx.GraphModule) -> list[object]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn_folds_into_conv(bias: bool) -> None:
    model = randomize_bn(ConvBN(bias=bias)).eval()
    x = torch.randn(2, 3, 8, 8)
    result = PassManager([FoldBatchNormPass(), EliminateDeadCodePass()]).run(capture(model, (x,)), (x,))
    gm = result.graph_module
    assert _targets(gm) == [aten.conv2d.default, aten.relu.default, aten.mean.dim, aten.linear.default]
    assert "bn" not in dict(gm.named_children())  # BN state dropped by cleanup
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_linear_bn1d_folds() -> None:
    model = randomize_bn(LinearBN()).eval()
    x = torch.randn(4, 6)
    gm = PassManager([FoldBatchNormPass()]).run(capture(model, (x,)), (x,)).graph_module
    assert aten.batch_norm.default not in _targets(gm)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_producer_with_other_users_is_left_alone() -> None:
    model = randomize_bn(SharedProducer()).eval()
    x = torch.randn(1, 3, 4, 4)
    result = PassManager([FoldBatchNormPass()]).run(capture(model, (x,)), (x,))
    assert not result.modified
    assert aten.batch_norm.default in _targets(result.graph_module)


def test_shared_weight_is_not_folded() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + self.conv(x).relu()

    model = randomize_bn(Tied()).eval()
    x = torch.randn(1, 4, 3, 3)
    assert not PassManager([FoldBatchNormPass()]).run(capture(model, (x,)), (x,)).modified


def test_bn_in_training_mode_graph_is_a_precondition_error() -> None:
    model = randomize_bn(ConvBN()).train()
    x = torch.randn(2, 3, 8, 8)
    gm = torch.export.export(model, (x,), strict=False).module()  # a training-mode graph, not captured
    bn = next(n for n in gm.graph.nodes if n.target == aten.batch_norm.default)
    assert bn.args[5] is True
    code = gm.code
    with pytest.raises(PreconditionError, match="'batch_norm' is a batch norm in training mode"):
        FoldBatchNormPass()(gm)
    assert gm.code == code  # checked before anything is touched
