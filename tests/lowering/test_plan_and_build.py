"""Plan (which nodes lower), compile_graph end to end, caching, and typed errors before compile."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

import tilefx
from tilefx.errors import LoweringError
from tilefx.lowering import build as build_mod
from tilefx.lowering import compat, openmp_launch
from tilefx.lowering.build import KernelCache, compile_graph, lowering_choices
from tilefx.lowering.fallback import LayerChoice, choose
from tilefx.lowering.plan import plan_graph
from tilefx.passes.metadata import BlockSparsity, Metadata, apply_masks, set_metadata
from tilefx.runtime.layout import token_pitch
from tilefx.runtime.sparse_modules import BsrConv2d, BsrLinear, _transposed_storage
from tilefx.timing import interleaved_times


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.dense_conv = torch.nn.Conv2d(16, 16, 1)  # no metadata: stays torch
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense_conv(torch.relu(self.conv(x))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(y)))


BLOCKS = {"conv.weight": (4, 9), "fc1.weight": (8, 1), "fc2.weight": (1, 4)}


def _pruned(
    batch: int = 2, blocks: dict[str, tuple[int, int]] = BLOCKS
) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(batch, 8, 6, 6)
    gm = torch.export.export(Net().eval(), (x,)).module()
    metadata = Metadata()
    for name, (r, c) in blocks.items():
        w = gm.get_parameter(name)
        mask = torch.rand(w.shape[0] // r, w[0].numel() // c) < 0.5
        metadata = metadata.with_annotation(name, BlockSparsity((r, c), mask))
    set_metadata(gm, metadata)
    apply_masks(gm, gm)
    return gm, x


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):  # type: ignore[no-untyped-def]
    gm, x = _pruned()
    cache_dir = tmp_path_factory.mktemp("kernels")
    return gm, x, compile_graph(gm, "llvm", cache_dir=cache_dir, fallback="never"), cache_dir


def test_plan_picks_the_annotated_layers_and_fuses_relu() -> None:
    gm, _ = _pruned()
    plan = plan_graph(gm)
    assert [(layer.op, layer.weight) for layer in plan.layers] == [
        ("conv2d", "conv.weight"),
        ("linear", "fc1.weight"),
        ("linear", "fc2.weight"),
    ]
    conv, fc1, fc2 = plan.layers
    assert conv.kernel == (3, 3) and conv.padding == (1, 1) and conv.input_shape == (2, 8, 6, 6)
    assert conv.activation == "relu" and fc1.activation == "relu" and fc2.activation is None
    assert conv.fused_node is not None and fc2.fused_node is None
    assert fc2.bias is None


def test_compiled_graph_matches_the_pruned_model(compiled) -> None:  # type: ignore[no-untyped-def]
    gm, x, out, _ = compiled
    torch.testing.assert_close(out(x), gm(x), rtol=1e-4, atol=1e-4)
    kinds = [type(m) for m in out.children()]
    assert kinds.count(BsrLinear) == 2 and kinds.count(BsrConv2d) == 1
    assert "aten.relu" not in out.code  # both relus were absorbed by kernel epilogues
    assert "dense_conv" in out.code  # the layer without metadata is still torch


def test_input_graph_module_is_not_modified(compiled) -> None:  # type: ignore[no-untyped-def]
    gm, _, _, _ = compiled
    assert "aten.linear" in gm.code and "aten.conv2d" in gm.code
    assert not any(isinstance(m, (BsrLinear, BsrConv2d)) for m in gm.modules())


def test_runtime_modules_run_other_batch_sizes(compiled) -> None:  # type: ignore[no-untyped-def]
    gm, _, out, _ = compiled
    layer = next(m for m in out.children() if isinstance(m, BsrLinear))
    for batch in (1, 128):
        x = torch.randn(batch, layer.in_features)
        w = gm.get_parameter("fc1.weight")
        torch.testing.assert_close(layer(x), torch.relu(torch.nn.functional.linear(x, w, gm.fc1.bias)))
    conv = next(m for m in out.children() if isinstance(m, BsrConv2d))
    x = torch.randn(1, 8, 5, 7)
    expected = torch.relu(torch.nn.functional.conv2d(x, gm.conv.weight, gm.conv.bias, padding=1))
    torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-4)


def test_runtime_rejects_a_mismatched_input(compiled) -> None:  # type: ignore[no-untyped-def]
    _, _, out, _ = compiled
    layer = next(m for m in out.children() if isinstance(m, BsrLinear))
    with pytest.raises(LoweringError, match="does not match"):
        layer(torch.randn(4, layer.in_features + 1))
    with pytest.raises(LoweringError, match="float32"):
        layer(torch.randn(4, layer.in_features, dtype=torch.float64))


def test_disk_cache_is_reused(compiled, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    gm, x, _, cache_dir = compiled
    assert len(list(cache_dir.glob("bsr_*.so"))) >= 3  # plus kernels other tests asked for
    monkeypatch.setattr(KernelCache, "_memory", {})
    monkeypatch.setattr(compat, "build", _no_compile)
    again = compile_graph(
        gm, "llvm", cache_dir=cache_dir, fallback="never"
    )  # must load every kernel from disk
    torch.testing.assert_close(again(x), gm(x), rtol=1e-4, atol=1e-4)


def _no_compile(*args: object, **kwargs: object) -> None:
    raise AssertionError("compiled although the kernel should have come from a cache")


@pytest.fixture
def forbid_compile(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(KernelCache, "_memory", {})
    monkeypatch.setattr(build_mod.compat, "build", _no_compile)


def test_unknown_target_is_rejected_before_compiling(forbid_compile) -> None:  # type: ignore[no-untyped-def]
    gm, _ = _pruned()
    with pytest.raises(LoweringError, match="unknown target 'tpu'"):
        compile_graph(gm, "tpu")


def test_block_not_dividing_is_rejected_before_compiling(forbid_compile) -> None:  # type: ignore[no-untyped-def]
    gm, _ = _pruned()
    metadata = Metadata().with_annotation(
        "fc1.weight", BlockSparsity((5, 1), torch.ones(6, 16, dtype=torch.bool))
    )
    set_metadata(gm, metadata)
    with pytest.raises(LoweringError, match=r"node 'linear'.*block \(5, 1\) does not tile"):
        compile_graph(gm)


class ComputedBias(torch.nn.Module):
    """Swin V2's attention builds its qkv bias in forward: no stored bias for a kernel to take."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.fc.weight, self.fc.bias * 2)


def test_a_sparse_layer_with_a_computed_bias_stays_dense_with_a_warning(caplog) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(4, 16)
    gm = torch.export.export(ComputedBias().eval(), (x,)).module()
    mask = torch.rand(4, 16) < 0.5
    set_metadata(gm, Metadata().with_annotation("fc.weight", BlockSparsity((8, 1), mask)))
    with caplog.at_level(logging.WARNING, logger="tilefx.lowering.plan"):
        assert plan_graph(gm).layers == ()
    assert "bias is computed in the graph" in caplog.text and "stays dense torch" in caplog.text


def test_non_float32_is_rejected_before_compiling(forbid_compile) -> None:  # type: ignore[no-untyped-def]
    gm, _ = _pruned()
    gm.fc1.weight.data = gm.fc1.weight.data.double()
    with pytest.raises(LoweringError, match=r"fc1.weight.*float32"):
        compile_graph(gm)


def test_mismatched_input_shape_is_rejected_before_compiling(forbid_compile) -> None:  # type: ignore[no-untyped-def]
    gm, _ = _pruned()
    node = next(n for n in gm.graph.nodes if n.name == "linear")
    source = node.args[0]
    source.meta["val"] = torch.empty(2, 17)
    with pytest.raises(LoweringError, match="input has 17 features, the weight expects 16"):
        compile_graph(gm)


def test_weight_disagreeing_with_its_mask_is_rejected(forbid_compile) -> None:  # type: ignore[no-untyped-def]
    gm, _ = _pruned()
    with torch.no_grad():
        gm.fc1.weight.fill_(1.0)  # nonzeros in dropped blocks
    with pytest.raises(LoweringError, match="node 'linear'.*apply the masks"):
        compile_graph(gm)


def test_plan_does_not_import_tvm() -> None:
    code = "import sys, tilefx.lowering.plan; assert 'tvm' not in sys.modules, 'plan imported tvm'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_importing_lowering_leaves_the_environment_alone() -> None:
    code = (
        "import os; before = dict(os.environ); "
        "import tilefx.lowering.build, tilefx.lowering.compat, tilefx.lowering.openmp_launch; "
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())"
    )
    env = {k: v for k, v in os.environ.items() if k != "TVM_THREAD_POOL_SPIN_COUNT"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


@pytest.mark.parametrize("preset", [None, "5000"])
def test_tvm_pool_sleeps_between_kernels_unless_the_user_chose(preset: str | None) -> None:
    """Set when a kernel that keeps TVM's pool is handed out (here: no launcher, no library)."""
    env = {k: v for k, v in os.environ.items() if k != "TVM_THREAD_POOL_SPIN_COUNT"}
    env["TILEFX_OPENMP_LAUNCH"] = "0"
    if preset is not None:
        env["TVM_THREAD_POOL_SPIN_COUNT"] = preset
    code = (
        "import os\n"
        "from tilefx.lowering import compat\n"
        "from tilefx.lowering.build import KernelCache\n"
        "from tilefx.lowering.kernels.spec import Conv2dGeometry, KernelSpec\n"
        "before = os.environ.get('TVM_THREAD_POOL_SPIN_COUNT')\n"
        "spec = KernelSpec(Conv2dGeometry.dense(4, 8), 8, (4, 4), 1)\n"
        "KernelCache().kernel(spec, compat.make_target('llvm'))\n"
        "print(before, os.environ.get('TVM_THREAD_POOL_SPIN_COUNT'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    assert done.stdout.split() == [str(preset), preset or "0"]


def test_runtime_accepts_unaligned_views(compiled) -> None:  # type: ignore[no-untyped-def]
    gm, _, out, _ = compiled
    layer = next(m for m in out.children() if isinstance(m, BsrLinear))
    x = torch.randn(1 + 8 * layer.in_features)[1:].view(8, -1)  # 4 bytes in: TVM rejects such pointers
    expected = torch.relu(torch.nn.functional.linear(x, gm.fc1.weight, gm.fc1.bias))
    torch.testing.assert_close(layer(x), expected)


def _timer_favouring(sparse_wins: set[str], plan_order=("conv2d", "linear", "linear_1")):  # type: ignore[no-untyped-def]
    """A fake timer: the kernel wins for layers whose node is in ``sparse_wins``; nothing is timed."""
    nodes = iter(plan_order)

    def timer(calls):  # type: ignore[no-untyped-def]
        assert set(calls) == {"sparse", "dense"}
        return {"sparse": 1.0, "dense": 2.0} if next(nodes) in sparse_wins else {"sparse": 2.0, "dense": 2.0}

    return timer


def test_measured_fallback_keeps_slower_layers_dense() -> None:
    gm, x = _pruned()
    out = compile_graph(gm, "llvm", timer=_timer_favouring({"linear"}))
    kinds = [type(m) for m in out.children()]
    assert kinds.count(BsrLinear) == 1 and kinds.count(BsrConv2d) == 0
    assert "aten.conv2d" in out.code and "aten.relu" in out.code  # conv and its relu stay torch
    choices = lowering_choices(out)
    assert [(c.node, c.lowered) for c in choices] == [
        ("conv2d", False),
        ("linear", True),
        ("linear_1", False),
    ]
    assert choices[1].sparse_ms == 1.0 and choices[1].dense_ms == 2.0
    torch.testing.assert_close(out(x), gm(x), rtol=1e-4, atol=1e-4)


def test_fallback_times_the_same_computation_both_ways() -> None:
    """The two calls handed to the timer compute the layer (conv with ReLU, linear with and without)."""
    seen = []

    def comparing_timer(calls):  # type: ignore[no-untyped-def]
        sparse, dense = calls["sparse"](), calls["dense"]()
        torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)
        seen.append(tuple(sparse.shape))
        return {"sparse": 1.0, "dense": 2.0}

    gm, _ = _pruned()
    compile_graph(gm, "llvm", timer=comparing_timer)
    assert seen == [(2, 16, 6, 6), (2, 32), (2, 8)]


def test_fallback_never_lowers_without_timing() -> None:
    def no_timer(calls):  # type: ignore[no-untyped-def]
        raise AssertionError("fallback='never' must not time anything")

    gm, x = _pruned()
    out = compile_graph(gm, "llvm", fallback="never", timer=no_timer)
    assert all(c.lowered and c.sparse_ms is None for c in lowering_choices(out))
    assert len(lowering_choices(out)) == 3


def test_unknown_fallback_is_rejected_before_compiling(forbid_compile) -> None:  # type: ignore[no-untyped-def]
    gm, _ = _pruned()
    with pytest.raises(LoweringError, match="unknown fallback 'sometimes'"):
        compile_graph(gm, fallback="sometimes")


def test_a_tie_stays_dense_and_is_described() -> None:
    choice = choose(
        "fc", lambda: None, lambda: None, "measure", timer=lambda calls: dict.fromkeys(calls, 3.0)
    )
    assert choice == LayerChoice(
        "fc", False, 3.0, 3.0, sparse_quartiles=(3.0, 3.0), dense_quartiles=(3.0, 3.0)
    )
    assert "dense torch" in choice.describe() and "1.00x" in choice.describe()


def test_the_default_timer_decides_by_medians_and_keeps_the_quartiles() -> None:
    slow = {"sparse": lambda: sum(range(20000)), "dense": lambda: None}
    choice = choose("fc", slow["sparse"], slow["dense"], "measure")
    assert not choice.lowered and choice.sparse_ms is not None and choice.dense_ms is not None
    assert choice.sparse_quartiles is not None and choice.sparse_quartiles[0] <= choice.sparse_ms
    assert choice.sparse_ms <= choice.sparse_quartiles[1] and "[" in choice.describe()


def test_interleaved_timer_alternates_the_calls() -> None:
    order: list[str] = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = interleaved_times(calls, rounds=3, warmup=1)
    assert {name: len(ts) for name, ts in times.items()} == {"a": 3, "b": 3}
    assert order == ["a", "b", "a", "b", "a", "b", "a", "b"]


def test_burst_timer_times_only_the_last_call_of_each_turn() -> None:
    order: list[str] = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = interleaved_times(calls, rounds=2, warmup=0, burst=3)
    assert {name: len(ts) for name, ts in times.items()} == {"a": 2, "b": 2}
    assert "".join(order) == "aaabbbaaabbb"


def test_openmp_spin_warning_names_the_fix_unless_waiting_is_passive(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(openmp_launch, "launcher_address", lambda: None)  # two pools, as without a compiler
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert "OMP_WAIT_POLICY=PASSIVE" in (openmp_launch.contention_warning(2) or "")
    assert openmp_launch.contention_warning(1) is None  # one torch thread: no worker to spin
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert openmp_launch.contention_warning(2) is None
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    assert openmp_launch.contention_warning(2) is None


def test_no_spin_warning_when_kernels_run_on_torchs_threads(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setattr(openmp_launch, "launcher_address", lambda: None)
    assert openmp_launch.contention_warning(2) is not None  # would warn with two pools...
    monkeypatch.setattr(openmp_launch, "launcher_address", lambda: 1)
    assert openmp_launch.contention_warning(2) is None  # ...but there is only one


def test_compile_warns_about_spinning_openmp_only_when_a_kernel_is_used(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(openmp_launch, "contention_warning", lambda threads: "spinning workers")
    gm, _ = _pruned()
    with caplog.at_level(logging.WARNING, logger="tilefx.lowering.build"):
        compile_graph(gm, "llvm", timer=_timer_favouring(set()))
    assert "spinning workers" not in caplog.text  # everything stayed torch
    with caplog.at_level(logging.WARNING, logger="tilefx.lowering.build"):
        compile_graph(gm, "llvm", timer=_timer_favouring({"linear"}))
    assert "spinning workers" in caplog.text


def test_cpu_kernels_run_on_torchs_openmp_threads_and_stay_exact(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import ctypes
    import shutil

    from tilefx.lowering.kernels.spec import Conv2dGeometry, KernelSpec
    from tilefx.runtime.packing import pack_bsr

    shared, why = openmp_launch.available()
    expected = sys.platform.startswith("linux") and bool(shutil.which("cc") or shutil.which("gcc"))
    if not shared and not expected:
        pytest.skip(f"kernels keep TVM's pool here: {why}")
    assert shared, why  # Linux with a C compiler: sharing torch's threads must work
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(64 // 8, 96 // 8, generator=gen) < 0.4
    weight = torch.randn(64, 96, generator=gen) * mask.repeat_interleave(8, 0).repeat_interleave(8, 1)
    packed = pack_bsr(weight, (8, 8), mask)
    spec = KernelSpec(Conv2dGeometry.dense(128, 96), 64, (8, 8), packed.nnzb)
    # Two cores, whatever this worker has: with one, the kernel's threads would be one task, run
    # inline without a parallel loop (and so without the hook this test checks).
    target = compat.make_target({"kind": "llvm", "num-cores": 2})
    cache = KernelCache(tmp_path)
    kernel = cache.kernel(spec, target)
    library = tmp_path / f"bsr_{cache.key(spec, target)}.so"
    hook = ctypes.c_void_p.in_dll(ctypes.CDLL(str(library)), "__TVMBackendParallelLaunch")
    assert hook.value == openmp_launch.launcher_address()
    x, bias = torch.randn(128, 96), torch.randn(64)
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):  # the team is torch's: its size follows torch.set_num_threads
            torch.set_num_threads(n)
            y = torch.empty(128, 64)
            kernel(x, packed.data, packed.indices, packed.indptr, bias, y)
            torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias), rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


def test_sharing_torchs_threads_can_be_turned_off() -> None:
    env = {**os.environ, "TILEFX_OPENMP_LAUNCH": "0"}
    code = "from tilefx.lowering import openmp_launch; print(openmp_launch.available())"
    done = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    assert "(False, 'disabled by TILEFX_OPENMP_LAUNCH=0')" in done.stdout


class Ffn(torch.nn.Module):
    """A transformer FFN (fc1 → GELU → fc2) whose output also feeds fc3 and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 64)
        self.fc3 = torch.nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        return self.fc3(h) + h


def _pruned_ffn(batch: int = 2, tokens: int = 32) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """(4, 4) blocks: the token-major template on AVX2 and AVX-512 alike."""
    torch.manual_seed(0)
    x = torch.randn(batch, tokens, 64)
    gm = torch.export.export(Ffn().eval(), (x,)).module()
    metadata = Metadata()
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        w = gm.get_parameter(name)
        metadata = metadata.with_annotation(
            name, BlockSparsity((4, 4), torch.rand(w.shape[0] // 4, w.shape[1] // 4) < 0.3)
        )
    set_metadata(gm, metadata)
    apply_masks(gm, gm)
    return gm, x


def test_plan_finds_linears_that_only_feed_sparse_linears() -> None:
    gm, _ = _pruned_ffn()
    fc1, fc2, fc3 = plan_graph(gm).layers
    assert fc1.activation == "gelu" and fc1.fused_node is not None  # the epilogue absorbs GELU
    assert fc1.consumers == (fc2.node,)
    unfused = plan_graph(gm, fuse_activations=False).layers[0]
    assert unfused.activation is None and unfused.consumers == (fc2.node,)  # through the GELU node
    assert fc2.consumers == ()  # also read by the residual add
    assert fc3.consumers == ()  # the graph output


def test_gelu_tanh_approximation_is_left_to_torch() -> None:
    class TanhGelu(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.gelu(self.fc(x), approximate="tanh")

    gm = torch.export.export(TanhGelu().eval(), (torch.randn(4, 16),)).module()
    set_metadata(
        gm, Metadata().with_annotation("fc.weight", BlockSparsity((4, 4), torch.ones(4, 4, dtype=torch.bool)))
    )
    (layer,) = plan_graph(gm).layers
    assert layer.activation is None and layer.fused_node is None


@pytest.mark.parametrize("fuse", [True, False], ids=["gelu-fused", "gelu-in-torch"])
@pytest.mark.parametrize(("batch", "tokens"), [(2, 32), (3, 7)])
def test_sparse_linears_hand_over_transposed_activations(batch: int, tokens: int, fuse: bool) -> None:
    """fc1 returns Yᵀ, fc2 reads it token-major: same result, no transposes.

    21 tokens are not whole vectors: Yᵀ is then stored with a pitch of 32 columns, which fc2
    reads in place when GELU is fused, and copies row by row when torch's GELU dropped it.
    """
    gm, x = _pruned_ffn(batch, tokens)
    out = compile_graph(gm, "llvm", fallback="never", fuse_activations=fuse)
    fc1, fc2, fc3 = lowering_choices(out)
    assert fc1.transposed_to == (fc2.node,) and fc2.transposed_to == () and "Yᵀ to" in fc1.describe()
    modules = dict(out.named_children())
    seen = []
    reader = modules[f"bsr_{fc2.node}"]
    reader.register_forward_pre_hook(
        lambda _, args: seen.append(_transposed_storage(args[0].reshape(-1, 128)))
    )
    torch.testing.assert_close(out(x), gm(x), rtol=1e-4, atol=1e-4)
    assert len(seen) == 1 and seen[0] is not None and seen[0].shape == (128, token_pitch(batch * tokens))
    assert reader.transposed_kernel(batch * tokens, True, False) is not None


def test_hand_over_is_built_in_not_switched_on_and_can_be_declined() -> None:
    """The plan's decision is a constructor argument of the module; ``hand_over=False`` skips it."""
    gm, x = _pruned_ffn()
    out = compile_graph(gm, "llvm", fallback="never")
    writer = dict(out.named_children())["bsr_linear"]
    assert isinstance(writer, BsrLinear) and writer.transposed_output
    with pytest.raises(AttributeError):
        writer.transposed_output = False  # type: ignore[misc]
    row_major = compile_graph(gm, "llvm", fallback="never", hand_over=False)
    assert all(c.transposed_to == () for c in lowering_choices(row_major))
    assert not any(isinstance(m, BsrLinear) and m.transposed_output for m in row_major.children())
    torch.testing.assert_close(row_major(x), out(x), rtol=1e-4, atol=1e-4)


def test_fuse_relu_still_works_but_warns_it_was_renamed() -> None:
    gm, x = _pruned_ffn()
    with pytest.warns(DeprecationWarning, match="fuse_activations"):
        out = tilefx.compile(gm, target="llvm", fallback="never", fuse_relu=False)
    targets = {str(n.target) for n in out.graph.nodes if n.op == "call_function"}
    assert "aten.gelu.default" in targets  # fusion off: torch still runs the GELU
    torch.testing.assert_close(out(x), gm(x), rtol=1e-4, atol=1e-4)


def test_no_transposed_handover_to_a_reader_kept_dense() -> None:
    gm, x = _pruned_ffn()
    order = ("linear", "linear_1", "linear_2")
    out = compile_graph(gm, "llvm", timer=_timer_favouring({"linear", "linear_2"}, order))
    assert [(c.node, c.lowered, c.transposed_to) for c in lowering_choices(out)] == [
        ("linear", True, ()),
        ("linear_1", False, ()),
        ("linear_2", True, ()),
    ]
    torch.testing.assert_close(out(x), gm(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("faster", ["hand-over", "row-major"])
def test_measured_hand_over_is_kept_only_when_faster(faster: str) -> None:
    timed = []

    def timer(calls):  # type: ignore[no-untyped-def]
        if set(calls) == {"sparse", "dense"}:
            return {"sparse": 1.0, "dense": 2.0}
        outputs = {name: call() for name, call in calls.items()}  # both ways compute the same
        torch.testing.assert_close(outputs["hand-over"], outputs["row-major"], rtol=1e-4, atol=1e-4)
        timed.append(set(calls))
        return {name: 1.0 if name == faster else 2.0 for name in calls}

    gm, x = _pruned_ffn()
    out = compile_graph(gm, "llvm", timer=timer)
    fc1 = lowering_choices(out)[0]
    assert timed == [{"hand-over", "row-major"}]  # fc1 alone has sparse readers only
    assert fc1.transposed_to == (("linear_1",) if faster == "hand-over" else ())
    torch.testing.assert_close(out(x), gm(x), rtol=1e-4, atol=1e-4)


def test_runtime_takes_any_input_layout() -> None:
    """A transposed or strided input is correct whether or not a transposed kernel exists for it."""
    gm, x = _pruned_ffn()
    out = compile_graph(gm, "llvm", fallback="never")
    layer = next(m for m in out.children() if isinstance(m, BsrLinear) and m.in_features == 128)
    w, b = gm.get_parameter("fc2.weight"), gm.get_parameter("fc2.bias")
    for rows in (64, 10):  # its own pitch, and not
        for xt in (torch.randn(128, rows).T, torch.randn(128, token_pitch(rows))[:, :rows].T):
            torch.testing.assert_close(layer(xt), torch.nn.functional.linear(xt, w, b), rtol=1e-4, atol=1e-4)
    strided = torch.randn(64, 256)[:, ::2]
    torch.testing.assert_close(
        layer(strided), torch.nn.functional.linear(strided, w, b), rtol=1e-4, atol=1e-4
    )
    writer = next(m for m in out.children() if isinstance(m, BsrLinear) and m.transposed_output)
    w1, b1 = gm.get_parameter("fc1.weight"), gm.get_parameter("fc1.bias")
    for shape in ((2, 32, 64), (1, 64), (3, 7, 64)):  # Yᵀ where a tile divides M, row-major elsewhere
        xb = torch.randn(shape)
        expected = torch.nn.functional.gelu(torch.nn.functional.linear(xb, w1, b1))  # GELU fused
        torch.testing.assert_close(writer(xb), expected, rtol=1e-4, atol=1e-4)
