"""What every generated graph must satisfy, as checks a property test or a regression test calls.

Each pass runs under the pipeline's own verification and is then checked again from outside,
on the example inputs and on fresh ones the verifier never saw, with both sides evaluated in
float64 (weights widened, not changed), where fp32 summation order is invisible and a wrong
index is not:
- :func:`check_exact`: fold-BN and reordering with random orders reproduce the original model
  (≤ 1e-5 of the output scale for a float32 model, ≤ 1e-10 for a float64 one).
- :func:`check_pruning`: a recipe's pipeline pass by pass: exact passes as above; block and
  connection pruning bit for bit (same code, weights = input weights × the recorded mask, the
  lowest-L1 blocks dropped, the global connection count); channel pruning against the input
  with the removed channels' parameter slices zeroed (≤ 1e-10).
- :func:`check_lowering`: ``tilefx.compile(fallback="never")`` lowers every block-sparse layer
  and matches the pruned torch model to ≤ 1e-4 of the output scale.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx

import tilefx
from tests.random_models import Attention, Concat, Layer, ModelSpec, Residual, Split, build
from tilefx.graph_capture import capture
from tilefx.lowering.build import lowering_choices
from tilefx.lowering.plan import plan_graph
from tilefx.passes.analysis.block_selection import block_sums
from tilefx.passes.cleanup import EliminateDeadCodePass
from tilefx.passes.fold_batchnorm import FoldBatchNormPass
from tilefx.passes.graph_utils import attr_tensor
from tilefx.passes.infra import AnalysisManager, Instrument, PassBase, PassManager, PassResult
from tilefx.passes.metadata import BlockSparsity, ChannelSelection, Permutation, get_metadata, matrix_view
from tilefx.passes.prune_blocks import PruneBlocksPass
from tilefx.passes.prune_channels import PruneChannelsPass
from tilefx.passes.prune_connections import PruneConnectionsPass
from tilefx.passes.reorder_dims import ReorderDimsPass, random_planner
from tilefx.pipeline import default_pipeline

__all__ = ["Ran", "assert_close_to_scale", "check_exact", "check_lowering", "check_pruning"]


@dataclass
class Ran(Instrument):
    """Records (pass, modified) after the pipeline's VerifyInstrument, which runs first: a pass
    recorded here ran and passed verification."""

    passes: list[tuple[str, bool]] = field(default_factory=list)

    def after_pass(
        self, pass_: PassBase, before: torch.fx.GraphModule | None, result: PassResult, am: AnalysisManager
    ) -> None:
        self.passes.append((pass_.name, result.modified))


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    """max |actual − expected| ≤ tolerance × max(max |expected|, 1e-6)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-6)
    assert error <= tolerance * scale, f"{what}: error {error:.3g} > {tolerance:g} × scale {scale:.3g}"


def _fresh(inputs: Sequence[torch.Tensor], seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(x.shape, generator=generator).to(x.dtype) for x in inputs)


def _run(
    passes: Sequence[PassBase], gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor]
) -> tuple[torch.fx.GraphModule, list[tuple[str, bool]]]:
    """Run ``passes`` verified on a copy of ``gm``; the result and what ran."""
    ran = Ran()
    result = PassManager(passes, [ran], verify=True).run(copy.deepcopy(gm), inputs)
    assert [name for name, _ in ran.passes] == [p.name for p in passes], ran.passes
    return result.graph_module, ran.passes


@torch.no_grad()
def check_exact(spec: ModelSpec, dtype: torch.dtype = torch.float32, order_seed: int = 0) -> None:
    """Fold-BN, dead-code elimination and random reordering reproduce the original model."""
    model, inputs = build(spec, dtype)
    passes = [
        FoldBatchNormPass(),
        EliminateDeadCodePass(),
        ReorderDimsPass(planner=random_planner(order_seed)),
    ]
    out, _ = _run(passes, capture(model, inputs), inputs)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    _assert_same_in_float64(
        out, model, (inputs, _fresh(inputs, spec.seed + 1)), tolerance, f"exact passes, {dtype}"
    )
    for records in get_metadata(out).params.values():
        for record in records:
            if isinstance(record, Permutation):
                assert sorted(record.order) == list(range(len(record.order)))


def _assert_same_in_float64(
    actual: torch.nn.Module,
    expected: torch.nn.Module,
    inputs: Sequence[tuple[torch.Tensor, ...]],
    tolerance: float,
    what: str,
) -> None:
    """Both evaluated in float64, weights widened but not changed: fp32 summation order (which a
    permutation changes) is invisible there, a wrong index is not."""
    wide_actual, wide_expected = copy.deepcopy(actual).double(), copy.deepcopy(expected).double()
    for i, x in enumerate(inputs):
        wide = tuple(t.double() for t in x)
        assert_close_to_scale(wide_actual(*wide), wide_expected(*wide), tolerance, f"{what}, inputs {i}")


@torch.no_grad()
def check_pruning(spec: ModelSpec, recipe: tilefx.Recipe) -> torch.fx.GraphModule:
    """Run the recipe's default pipeline pass by pass, each verified and checked from outside."""
    model, inputs = build(spec)
    gm = capture(model, inputs)
    for pass_ in default_pipeline(recipe):
        after, ran = _run([pass_], gm, inputs)
        if ran[0][1]:
            _check_pass(pass_, gm, after, inputs, spec)
        gm = after
    assert_close_to_scale(gm(*inputs), gm(*inputs), 0.0, "pruned model is deterministic")
    assert gm(*inputs).shape == model(*inputs).shape
    return gm


def _check_pass(
    pass_: PassBase,
    before: torch.fx.GraphModule,
    after: torch.fx.GraphModule,
    inputs: tuple[torch.Tensor, ...],
    spec: ModelSpec,
) -> None:
    fresh = _fresh(inputs, spec.seed + 1)
    what = f"{pass_.name} from outside"
    if pass_.numerics == "exact":
        _assert_same_in_float64(after, before, (inputs, fresh), 1e-5, what)
        return
    reference = _masked_by_hand(pass_, before, after, spec)
    if reference is not None:  # the same weights, some sliced away, some zeroed: equal in float64
        _assert_same_in_float64(after, reference, (inputs, fresh), 1e-10, what)


def _masked_by_hand(
    pass_: PassBase, before: torch.fx.GraphModule, after: torch.fx.GraphModule, spec: ModelSpec
) -> torch.fx.GraphModule | None:
    """The input with what the pass claims to remove zeroed, derived from its records alone."""
    if isinstance(pass_, (PruneBlocksPass, PruneConnectionsPass)):
        _check_sparse_weights(pass_, before, after)
        return None  # same code and bitwise weights: the same function
    if isinstance(pass_, PruneChannelsPass) and not _has(spec, Attention):
        # Zeroing parameter slices silences a removed channel at every weight that reads it;
        # only attention contracts activations with no weight in between, so it is left out.
        return _zero_removed_channels(before, after)
    return None


def _check_sparse_weights(pass_: PassBase, before: torch.fx.GraphModule, after: torch.fx.GraphModule) -> None:
    assert after.code == before.code, f"{pass_.name} changed the graph code"
    old, new = get_metadata(before), get_metadata(after)
    dropped_total = grid_total = 0
    for name, weight in after.named_parameters():
        original = before.get_parameter(name)
        records, previous = new.of(name, BlockSparsity), old.of(name, BlockSparsity)
        if not records or (previous and _same(records[-1], previous[-1])):
            assert torch.equal(weight, original), f"{name} changed without a new sparsity record"
            continue
        record = records[-1]
        mask = record.element_mask(weight.shape)
        assert torch.equal(weight, original * mask), f"{name} is not its input × its recorded mask"
        dropped_total += int((~record.mask).sum())
        grid_total += record.mask.numel()
        if isinstance(pass_, PruneBlocksPass):
            _check_lowest_blocks(name, original, record, pass_.sparsity)
    if isinstance(pass_, PruneConnectionsPass) and pass_.scope == "global":
        assert dropped_total == min(grid_total, math.floor(grid_total * pass_.sparsity + 1e-9))


def _check_lowest_blocks(name: str, original: torch.Tensor, record: BlockSparsity, sparsity: float) -> None:
    sums = block_sums(matrix_view(original).abs().double().numpy(), record.block)
    keep = record.mask.numpy().astype(bool)
    dropped = int((~keep).sum())
    assert dropped == math.floor(sparsity * keep.size + 1e-9), (
        f"{name}: {dropped} of {keep.size} blocks dropped"
    )
    if keep.all() or not keep.any():
        return
    assert sums[~keep].max() <= sums[keep].min(), f"{name}: a dropped block outweighs a kept one"


def _same(a: BlockSparsity, b: BlockSparsity) -> bool:
    return a.block == b.block and torch.equal(a.mask.bool(), b.mask.bool())


def _zero_removed_channels(before: torch.fx.GraphModule, after: torch.fx.GraphModule) -> torch.fx.GraphModule:
    reference = copy.deepcopy(before)
    old = get_metadata(before)
    for name, records in get_metadata(after).params.items():
        for selection in records:
            if not isinstance(selection, ChannelSelection) or selection in old.of(name, ChannelSelection):
                continue
            tensor = attr_tensor(reference, name)
            removed = np.setdiff1d(np.arange(selection.original), np.array(selection.kept, dtype=np.int64))
            tensor.index_fill_(selection.dim, torch.from_numpy(removed), 0.0)
    return reference


def _has(spec: ModelSpec, kind: type) -> bool:
    def walk(layers: Sequence[Layer]) -> bool:
        for layer in layers:
            if isinstance(layer, kind):
                return True
            if isinstance(layer, Residual) and walk(layer.body):
                return True
            if isinstance(layer, Concat) and any(walk(b) for b in layer.branches):
                return True
            if isinstance(layer, Split) and any(walk(b) for b in layer.bodies):
                return True
        return False

    return walk(spec.first) or walk(spec.second)


@torch.no_grad()
def check_lowering(spec: ModelSpec, blocks: tilefx.BlockPruning, *, expect_layers: bool = True) -> None:
    """Every block-sparse layer is lowered; the compiled model matches the pruned torch model."""
    model, inputs = build(spec)
    pruned = tilefx.optimize(model, inputs, recipe=tilefx.Recipe(blocks=blocks))
    planned = plan_graph(pruned).layers
    if not planned:
        assert not expect_layers, "the recipe left nothing to lower"
        return
    compiled = tilefx.compile(pruned, fallback="never")
    choices = lowering_choices(compiled)
    assert [c.node for c in choices] == [layer.node for layer in planned]
    assert all(c.lowered for c in choices)
    for i, x in enumerate((inputs, _fresh(inputs, spec.seed + 1))):
        assert_close_to_scale(compiled(*x), pruned(*x), 1e-4, f"lowered vs pruned torch, inputs {i}")
