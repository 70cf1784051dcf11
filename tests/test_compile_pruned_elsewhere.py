"""``tilefx.compile`` on models pruned elsewhere: by hand, by torch.ao.pruning, by Torch-Pruning."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch.ao.pruning import WeightNormSparsifier

import tilefx
from tests.models import MLP
from tilefx.lowering.build import lowering_choices
from tilefx.passes.metadata import BlockSparsity, get_metadata

X = torch.randn(4, 64)


def _zero_16x1_blocks(layer: nn.Linear, sparsity: float) -> None:
    """Hand pruning: zero ``sparsity`` of the 16x1 blocks (16 output rows, one input column)."""
    weight = layer.weight
    gen = torch.Generator().manual_seed(weight.shape[0])
    keep = torch.rand(weight.shape[0] // 16, weight.shape[1], generator=gen) >= sparsity
    with torch.no_grad():
        weight.mul_(keep.repeat_interleave(16, 0))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_hand_pruned_symbolic_trace_is_lowered_and_matches_it() -> None:
    model = MLP().eval()
    for layer in (model.fc1, model.fc2):
        _zero_16x1_blocks(layer, 0.9)
    traced = torch.fx.symbolic_trace(model)
    before = _state(traced)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tilefx.CoverageWarning)
        compiled = tilefx.compile(traced, (X,), fallback="never")
    assert [c.lowered for c in lowering_choices(compiled)] == [True, True]
    records = get_metadata(compiled).params
    assert [r.block for r in records["fc1.weight"] if isinstance(r, BlockSparsity)] == [(16, 1)]
    torch.testing.assert_close(compiled(X), model(X), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, _state(traced)[k]) for k, v in before.items())
    assert tilefx.passes.metadata.METADATA_KEY not in traced.meta


def test_a_torch_ao_pruned_model_gets_sparse_kernels() -> None:
    model = MLP().eval()
    sparsifier = WeightNormSparsifier(sparsity_level=0.75, sparse_block_shape=(16, 1), zeros_per_block=16)
    sparsifier.prepare(model, config=[{"tensor_fqn": "fc1.weight"}, {"tensor_fqn": "fc2.weight"}])
    sparsifier.step()
    sparsifier.squash_mask()
    compiled = tilefx.compile(model, (X,), fallback="never")
    chosen = {c.node: c.lowered for c in lowering_choices(compiled)}
    assert chosen == {"linear": True, "linear_1": True}
    (record,) = [r for r in get_metadata(compiled).params["fc2.weight"] if isinstance(r, BlockSparsity)]
    assert record.block == (16, 1) and record.sparsity == pytest.approx(0.75)
    torch.testing.assert_close(compiled(X), model(X), rtol=1e-5, atol=1e-5)


def test_a_dense_module_compiles_with_the_nothing_lowered_warning_saying_why() -> None:
    model = MLP().eval()
    with pytest.warns(tilefx.CoverageWarning, match="lowered nothing: no layer of the graph is block-sparse"):
        compiled = tilefx.compile(model, (X,))
    torch.testing.assert_close(compiled(X), model(X))


def test_a_torch_pruning_channel_pruned_model_stays_dense_with_the_warning() -> None:
    tp = pytest.importorskip("torch_pruning")
    model = MLP().eval()
    example = torch.randn(1, 64)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    group = graph.get_pruning_group(model.fc1, tp.prune_linear_out_channels, idxs=list(range(0, 128, 2)))
    group.prune()
    assert model.fc1.out_features == 64 and model.fc2.in_features == 64
    with pytest.warns(tilefx.CoverageWarning, match="lowered nothing"):
        compiled = tilefx.compile(model, (X,))
    assert lowering_choices(compiled) == ()
    torch.testing.assert_close(compiled(X), model(X))


def test_the_target_given_second_still_works_with_a_deprecation_warning() -> None:
    model = MLP().eval()
    _zero_16x1_blocks(model.fc1, 0.9)
    gm = tilefx.capture(model, (X,))
    with pytest.warns(DeprecationWarning, match="target by keyword"):
        compiled = tilefx.compile(gm, "llvm", fallback="never")
    assert [c.lowered for c in lowering_choices(compiled)] == [True]
