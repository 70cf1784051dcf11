"""``tilefx.compile`` of a quantized graph: the fake-quant node and its linear become one int8/bf16
kernel module that computes what the optimized torch graph computes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilefx
from tilefx.errors import LoweringError
from tilefx.lowering import compat
from tilefx.lowering.build import compile_graph, lowering_choices
from tilefx.passes.quantize_linears import Quantization
from tilefx.runtime.sparse_modules import NarrowLinear

FEATURES = compat.cpu_features(compat.make_target("llvm"))
needs_vnni = pytest.mark.skipif("avx512vnni" not in FEATURES, reason="CPU has no AVX512-VNNI")
X = torch.randn(40, 128)  # 40 rows: no tile size divides it


class FFN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def _quantized(
    quantize: Quantization, block: tuple[int, int] | None = None, calibration: object = None
) -> torch.fx.GraphModule:
    blocks = tilefx.BlockPruning(block=block, sparsity=0.75, reorder="none") if block else None
    recipe = tilefx.Recipe(blocks=blocks, quantize=quantize)
    return tilefx.optimize(FFN().eval(), (X,), recipe, calibration)  # type: ignore[arg-type]


def _close_to_graph(compiled: torch.nn.Module, gm: torch.fx.GraphModule) -> None:
    """Equal to the graph up to fp32 summation order, and up to one code step where that order
    tips a second-layer input across a rounding boundary: such a flip moves one row of the output
    by 1/255 of the row's range times a weight (about 1e-3 of the output's range here), so a few
    rows may differ by that much and no element by more."""
    with torch.no_grad():
        expected, got = gm(X), compiled(X)
    scale = float(expected.abs().max())
    err = (got - expected).abs()
    assert float(err.max()) <= 5e-3 * scale
    rows_off = (err > 1e-4 * scale).any(dim=-1)
    assert float(rows_off.float().mean()) <= 0.1, f"{int(rows_off.sum())} of {len(rows_off)} rows"


def _narrow_modules(compiled: torch.fx.GraphModule) -> list[NarrowLinear]:
    return [m for m in compiled.modules() if isinstance(m, NarrowLinear)]


@needs_vnni
@pytest.mark.parametrize(
    ("block", "layout"),
    [(None, "dense"), ((16, 4), "bsr"), ((4, 4), "bsr"), ((32, 8), "bsr")],
    ids=["dense", "16x4", "4x4", "32x8-as-16x4"],
)
def test_int8_layers_run_int8_kernels_equal_to_the_graph(block, layout) -> None:  # type: ignore[no-untyped-def]
    gm = _quantized(Quantization(), block)
    compiled = tilefx.compile(gm, fallback="never")
    modules = _narrow_modules(compiled)  # type: ignore[arg-type]
    assert [m.layout for m in modules] == [layout, layout]
    assert all(m.number_format == "int8" for m in modules)
    targets = {str(n.target) for n in compiled.graph.nodes}  # type: ignore[union-attr]
    assert not any(t.startswith(("aten.linear", "aten.gelu", "tilefx.")) for t in targets)  # all folded
    _close_to_graph(compiled, gm)


@needs_vnni
def test_static_scheme_compiles_to_its_grid() -> None:
    gm = _quantized(Quantization(scheme="static"), (16, 4), calibration=[(X, None)])
    compiled = tilefx.compile(gm, fallback="never")
    _close_to_graph(compiled, gm)


@pytest.mark.skipif("avx512bf16" not in FEATURES, reason="CPU has no AVX512-BF16")
@pytest.mark.parametrize("block", [None, (4, 2)], ids=["dense", "4x2"])
def test_bf16_layers_run_bf16_kernels(block) -> None:  # type: ignore[no-untyped-def]
    gm = _quantized(Quantization(format="bf16"), block)
    compiled = tilefx.compile(gm, fallback="never")
    assert all(m.number_format == "bf16" for m in _narrow_modules(compiled))  # type: ignore[arg-type]
    _close_to_graph(compiled, gm)


@needs_vnni
def test_a_block_no_int8_template_takes_runs_dense_with_a_warning() -> None:
    gm = _quantized(Quantization(), (16, 1))
    with pytest.warns(tilefx.CoverageWarning, match=r"block \(16, 1\) fits no int8 template"):
        compiled = tilefx.compile(gm)
    assert [m.layout for m in _narrow_modules(compiled)] == ["dense", "dense"]  # type: ignore[arg-type]
    _close_to_graph(compiled, gm)


@needs_vnni
@pytest.mark.parametrize("sparse_faster", [True, False])
def test_measured_choice_is_int8_sparse_against_int8_dense(sparse_faster: bool) -> None:
    gm = _quantized(Quantization(), (16, 4))

    def timer(calls):  # type: ignore[no-untyped-def]
        assert set(calls) == {"sparse", "dense"}
        for call in calls.values():
            call()  # both are our int8 modules: neither is torch's fake-quant graph
        return {"sparse": 1.0 if sparse_faster else 3.0, "dense": 2.0}

    compiled = compile_graph(gm, "llvm", timer=timer)
    choices = lowering_choices(compiled)
    assert all(c.lowered and c.number_format == "int8" and c.sparse == sparse_faster for c in choices)
    assert {m.layout for m in _narrow_modules(compiled)} == {"bsr" if sparse_faster else "dense"}
    assert "int8 dense" in choices[0].describe()


@needs_vnni
def test_a_shape_no_kernel_takes_stays_the_torch_simulation() -> None:
    model = nn.Sequential(nn.Linear(20, 32)).eval()  # in_features 20: not a multiple of 16
    x = torch.randn(8, 20)
    gm = tilefx.optimize(model, (x,), tilefx.Recipe(quantize=Quantization()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = tilefx.compile(gm)
    assert [str(w.message) for w in caught if "fake-quant simulation" in str(w.message)]
    assert not _narrow_modules(compiled)  # type: ignore[arg-type]
    torch.testing.assert_close(compiled(x), gm(x))


def test_missing_cpu_feature_is_a_lowering_error(monkeypatch: pytest.MonkeyPatch) -> None:
    gm = _quantized(Quantization())
    monkeypatch.setattr(compat, "cpu_features", lambda target: frozenset({"avx2", "avx512f"}))
    with pytest.raises(LoweringError, match="'avx512vnni'"):
        tilefx.compile(gm)
    bf16 = _quantized(Quantization(format="bf16"))
    with pytest.raises(LoweringError, match="'avx512bf16'"):
        tilefx.compile(bf16)


def test_int8_on_cuda_is_a_lowering_error() -> None:
    gm = _quantized(Quantization())
    with warnings.catch_warnings(), pytest.raises(LoweringError, match="CPU-only for now"):
        compile_graph(gm, "cuda")
