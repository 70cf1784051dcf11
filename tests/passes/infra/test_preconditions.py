"""Every pass's ``Requires:`` is checked before it runs and raises a typed error naming node and fix."""

from __future__ import annotations

import pytest
import torch
import torch.fx

import tilefx
from tests.models import ConvBN, randomize_bn
from tilefx.errors import PassError, PreconditionError
from tilefx.graph_capture import capture
from tilefx.passes.cleanup import EliminateDeadCodePass
from tilefx.passes.fold_batchnorm import FoldBatchNormPass
from tilefx.passes.infra import PassBase, PassManager
from tilefx.passes.prune_blocks import PruneBlocksPass
from tilefx.passes.prune_channels import PruneChannelsPass
from tilefx.passes.prune_connections import PruneConnectionsPass
from tilefx.passes.reorder_dims import ReorderDimsPass, random_planner

ATEN_PASSES = [
    EliminateDeadCodePass(),  # a submodule call reads state it cannot see: it would delete it
    FoldBatchNormPass(),
    PruneChannelsPass(ratio=0.5),
    PruneConnectionsPass(sparsity=0.5),
    PruneBlocksPass(block=(1, 1), sparsity=0.5),
    ReorderDimsPass(planner=random_planner(0)),
]


@pytest.mark.parametrize("pass_", ATEN_PASSES, ids=lambda p: p.name)
def test_passes_reading_aten_ops_refuse_a_symbolic_trace_graph(pass_: PassBase) -> None:
    traced = torch.fx.symbolic_trace(ConvBN().eval())  # nn.Conv2d calls: no aten.conv2d to find
    with pytest.raises(PreconditionError, match=f"{pass_.name}: 'conv' calls 'conv'.*tilefx.capture") as info:
        pass_(traced)
    assert info.value.node == "conv"


@pytest.mark.parametrize("pass_", ATEN_PASSES, ids=lambda p: p.name)
def test_passes_reading_aten_ops_accept_a_plain_export_graph(pass_: PassBase) -> None:
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(ConvBN().eval(), (x,), strict=False).module()  # keeps _guards_fn
    pass_.requires(exported, tilefx.passes.infra.AnalysisManager(exported, (x,)))


def _training_graph() -> tuple[torch.fx.GraphModule, tuple[torch.Tensor]]:
    x = torch.randn(2, 3, 8, 8)
    model = randomize_bn(ConvBN()).train()
    return torch.export.export(model, (x,), strict=False).module(), (x,)  # BN exported in training mode


def test_fold_batchnorm_refuses_a_training_mode_batch_norm_naming_it_and_the_fix() -> None:
    gm, inputs = _training_graph()
    with pytest.raises(
        PreconditionError, match="'batch_norm' is a batch norm in training mode.*model.eval()"
    ):
        FoldBatchNormPass()(gm)
    with pytest.raises(PreconditionError) as info:
        PassManager([EliminateDeadCodePass(), FoldBatchNormPass()]).run(gm, inputs)
    assert isinstance(info.value, PassError) and info.value.pass_name == "FoldBatchNormPass"
    assert info.value.node == "batch_norm"


def test_optimize_of_a_training_mode_export_is_a_precondition_error_unless_bn_is_kept() -> None:
    gm, inputs = _training_graph()
    with pytest.raises(tilefx.PreconditionError, match="fold_batchnorm=False"):
        tilefx.optimize(gm, inputs)
    kept = tilefx.optimize(gm, inputs, tilefx.Recipe(fold_batchnorm=False))
    assert any(n.target == torch.ops.aten.batch_norm.default for n in kept.graph.nodes)
    assert capture(gm, inputs).code == kept.code
