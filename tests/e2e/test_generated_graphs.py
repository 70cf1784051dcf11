"""Generated-graph equivalence: random small models through the exact, pruning and lowering paths.

The fast suite runs a fixed-seed sample; ``make test-slow`` runs over a thousand graphs. Every
failure hypothesis found is kept below as a regression test with its shrunk example.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import tilefx
import tilefx.passes.infra.verify as verify
from tests.graph_properties import check_exact, check_lowering, check_pruning
from tests.random_models import (
    LOWERABLE,
    Act,
    Affine,
    Attention,
    Concat,
    Conv,
    LayerNorm,
    Linear,
    ModelSpec,
    Residual,
    Split,
    model_specs,
)
from tilefx.errors import VerificationError

_SAMPLE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

BLOCKS = ((1, 1), (2, 1), (4, 1), (1, 4), (2, 2), (4, 4), (8, 1))


def recipes() -> st.SearchStrategy[tilefx.Recipe]:
    channels = st.builds(
        tilefx.ChannelPruning,
        ratio=st.sampled_from((0.25, 0.5, 0.75, 0.1)),
        criterion=st.sampled_from(("l1", "l2")),  # bn_scale refuses groups without a BN (RecipeError)
        scope=st.sampled_from(("layer", "global")),
        round_to=st.sampled_from((1, 2, 4)),
        attention=st.sampled_from(("head_dims", "heads")),
    )
    connections = st.builds(
        tilefx.ConnectionPruning,
        sparsity=st.sampled_from((0.5, 0.25, 0.9)),
        criterion=st.sampled_from(("l1", "synaptic_strength")),
    )
    blocks = st.builds(
        tilefx.BlockPruning,
        block=st.sampled_from(BLOCKS),
        sparsity=st.sampled_from((0.5, 0.0, 0.75, 0.9)),
        reorder=st.sampled_from(("none", "tetris")),
    )
    return st.builds(
        tilefx.Recipe,
        fold_batchnorm=st.booleans(),
        channels=st.none() | channels,
        connections=st.none() | connections,
        blocks=st.none() | blocks,
    )


@settings(_SAMPLE, max_examples=20)
@given(model_specs(), st.sampled_from((torch.float32, torch.float64)), st.integers(0, 2**16))
def test_exact_passes_on_generated_graphs(spec: ModelSpec, dtype: torch.dtype, order_seed: int) -> None:
    check_exact(spec, dtype, order_seed)


@settings(_SAMPLE, max_examples=12)
@given(model_specs(), recipes())
def test_pruning_passes_on_generated_graphs(spec: ModelSpec, recipe: tilefx.Recipe) -> None:
    check_pruning(spec, recipe)


LOWERED_BLOCKS = ((8, 1), (4, 1), (4, 4))
LOWERED_SPARSITIES = (0.0, 0.5, 0.8)


def lowered_cases() -> st.SearchStrategy[tuple[ModelSpec, tilefx.BlockPruning]]:
    spec = st.builds(replace, st.sampled_from(list(LOWERABLE.values())), seed=st.integers(0, 2**16))
    blocks = st.builds(
        tilefx.BlockPruning,
        block=st.sampled_from(LOWERED_BLOCKS),
        sparsity=st.sampled_from(LOWERED_SPARSITIES),
        reorder=st.sampled_from(("none", "tetris")),
    )
    return st.tuples(spec, blocks)


@pytest.mark.parametrize(
    ("name", "block", "sparsity"),
    [("ffn", (8, 1), 0.0), ("encoder", (4, 1), 0.5), ("convnet", (4, 4), 0.8), ("separable", (8, 1), 0.5)],
)
def test_lowering_matches_the_pruned_model(name: str, block: tuple[int, int], sparsity: float) -> None:
    check_lowering(LOWERABLE[name], tilefx.BlockPruning(block=block, sparsity=sparsity))


# ----------------------------------------------------------------------------------------------
# Regression tests: the shrunk examples of every failure hypothesis found, kept verbatim.

_IMAGE3 = ModelSpec(image=True, channels=3, size=3, reshape="mean", outputs=1)


def test_regression_an_input_added_to_a_layer_output_keeps_its_channels() -> None:
    """The add's other operand (here the pooled model input) has no channel identity and cannot
    change: the layer's channels were permuted anyway (output off by 0.3), and pruned (a shape
    error in the add); ``broadcast`` now freezes them."""
    check_exact(
        ModelSpec(
            image=False,
            channels=3,
            size=3,
            first=(),
            reshape="mean",
            second=(Residual((Linear(1, False),), False),),
            outputs=1,
            batch=2,
            seed=0,
        ),
        torch.float32,
        0,
    )
    check_pruning(
        ModelSpec(
            image=False,
            channels=16,
            size=8,
            first=(Residual((LayerNorm(), Attention(heads=2, head_dim=8))),),
            reshape="tokens",
            outputs=4,
            seed=12,
        ),
        tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.25)),
    )


@pytest.mark.parametrize("how", ["chunk", "sizes", "slices"])
def test_regression_split_parts_never_trade_channels(how: str) -> None:
    """A permutation of the conv's channels moved some across the chunk boundary, into a part
    that another op reads (output off by 0.55); parts now never share a channel group."""
    spec = replace(
        _IMAGE3,
        first=(
            Conv(out=4, kernel=1, stride=1, dilation=1, groups=1, same=False, bias=False),
            Split(bodies=((), (Residual(body=(), project=False),)), how=how),  # type: ignore[arg-type]
        ),
    )
    check_exact(spec, torch.float32, 0)
    check_pruning(spec, tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5)))


def test_regression_units_of_a_group_have_as_many_channels_in_every_split_part() -> None:
    """Attention's output repeats each head-dim unit once per head; chunking it with one more
    channel left units with 3 + 1 and 2 + 2 positions in the two parts, yet in one group, so a
    permutation moved positions across the boundary (off by 1.5). Shrunk by hand from a
    40-layer example; the group signature now counts each unit's positions per part."""
    spec = replace(
        _IMAGE3,
        first=(
            Conv(1),
            Concat(((Attention(heads=4, head_dim=8, project=False),), (Conv(3),)), True),
            Split(((), (Affine(bias=False),)), "chunk"),
        ),
        reshape="tokens",
        outputs=4,
        seed=547,
    )
    check_exact(spec, torch.float64, 1473)


def test_regression_a_group_with_a_ragged_slice_keeps_its_order() -> None:
    """Channels of two concatenated convs meet a grouped conv's per-group units after a residual
    add: unit 0 has two rows in one conv's weight, unit 1 one. That slice was left out of the
    group, which was still permuted, so those conv rows kept their order (off by 0.16); such a
    group's order is now fixed."""
    spec = replace(
        _IMAGE3,
        first=(
            Conv(7),
            Residual((Split(((), (Conv(8, bias=False),), (Conv(12, bias=False),)), "chunk"),), project=True),
            Residual((Split(((), (Conv(1, groups=4),), ()), "chunk"),)),
        ),
        seed=388,
    )
    check_exact(spec, torch.float64, 388)


def test_regression_a_block_pruned_grouped_conv_stays_dense_when_compiled() -> None:
    """Block pruning records grouped convs too, for which there is no kernel: compile raised
    ``LoweringError``; the layer now stays dense torch (its zeros are in the weight)."""
    spec = ModelSpec(
        image=True, channels=8, size=4, first=(Conv(8, kernel=3, groups=2), Conv(8, kernel=1)), outputs=8
    )
    check_lowering(spec, tilefx.BlockPruning(block=(4, 1), sparsity=0.5))


@pytest.mark.xfail(
    not hasattr(verify, "run_float64"),
    reason="verification compares exact passes in float32 until it checks them in float64 (issue 16 item 2)",
    raises=VerificationError,
    strict=True,
)
def test_regression_fp32_summation_order_is_not_a_verification_failure() -> None:
    """Found as a 40-layer example hypothesis could not shrink (the failure is rounding noise);
    this small one has the same cause: a random reorder of three 3×3 convs is exact, but in
    float32 the output (scale 0.0044) moves by 2.0e-5 of its scale, over verification's 1e-5."""
    spec = ModelSpec(
        image=True,
        channels=12,
        size=8,
        first=(Conv(12, kernel=3), Act("tanh"), Conv(12, kernel=3), Act("tanh"), Conv(12, kernel=3)),
        reshape="mean",
        outputs=1,
        batch=1,
        seed=57,
    )
    check_exact(spec, torch.float32, 57)


# ----------------------------------------------------------------------------------------------
# The long run (make test-slow): over a thousand generated graphs, in shards so workers share it.

_MANY = settings(_SAMPLE, derandomize=False, print_blob=True)


@pytest.mark.slow
@pytest.mark.exhaustive
@pytest.mark.parametrize("shard", range(4))
def test_exact_passes_on_many_generated_graphs(shard: int) -> None:
    @seed(shard)
    @settings(_MANY, max_examples=150)
    @given(model_specs(), st.sampled_from((torch.float32, torch.float64)), st.integers(0, 2**16))
    def check(spec: ModelSpec, dtype: torch.dtype, order_seed: int) -> None:
        check_exact(spec, dtype, order_seed)

    check()


@pytest.mark.slow
@pytest.mark.exhaustive
@pytest.mark.parametrize("shard", range(4))
def test_pruning_passes_on_many_generated_graphs(shard: int) -> None:
    @seed(shard)
    @settings(_MANY, max_examples=100)
    @given(model_specs(), recipes())
    def check(spec: ModelSpec, recipe: tilefx.Recipe) -> None:
        check_pruning(spec, recipe)

    check()


@pytest.mark.slow
@pytest.mark.exhaustive
def test_lowering_on_many_generated_graphs() -> None:
    @seed(0)
    @settings(_MANY, max_examples=40)
    @given(lowered_cases())
    def check(case: tuple[ModelSpec, tilefx.BlockPruning]) -> None:
        check_lowering(*case)

    check()


@pytest.mark.slow
@pytest.mark.exhaustive
def test_lowering_on_generated_structures() -> None:
    """Random structures too, with widths blocks divide and one input size, so kernels repeat."""
    blocks = st.builds(
        tilefx.BlockPruning,
        block=st.sampled_from(((4, 1), (8, 1))),
        sparsity=st.sampled_from((0.0, 0.5)),
        reorder=st.sampled_from(("none", "tetris")),
    )

    @seed(1)
    @settings(_MANY, max_examples=30)
    @given(model_specs(widths=(8, 16), sizes=(4,), depth=1), blocks)
    def check(spec: ModelSpec, blocks: tilefx.BlockPruning) -> None:
        check_lowering(spec, blocks, expect_layers=False)

    check()
