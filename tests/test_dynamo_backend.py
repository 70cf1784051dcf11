"""``torch.compile(model, backend="tilefx")``: same outputs as eager, kernels used, eager fallback."""

from __future__ import annotations

import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo

import tilefx
from tests.models import MLP
from tilefx import dynamo_backend
from tilefx.lowering import compat
from tilefx.runtime.sparse_modules import BsrLinear, NarrowLinear

X = torch.randn(4, 64)
ROOT = Path(__file__).resolve().parents[1]


def _block_pruned(dtype: torch.dtype = torch.float32) -> MLP:
    """An MLP whose weights are 80% zero in 16x1 blocks, as if pruned by some other tool."""
    model = MLP().eval().to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in (model.fc1, model.fc2):
            rows, cols = layer.weight.shape
            keep = torch.rand(rows // 16, cols, generator=gen) >= 0.8
            layer.weight.mul_(keep.repeat_interleave(16, 0).to(dtype))
    return model


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    forward = BsrLinear.forward

    def counted(self: BsrLinear, x: torch.Tensor) -> torch.Tensor:
        calls.append(type(self).__name__)
        return forward(self, x)

    monkeypatch.setattr(BsrLinear, "forward", counted)
    return calls


def test_backend_matches_eager_and_runs_the_kernels(kernel_calls: list[str]) -> None:
    model = _block_pruned()
    compiled = torch.compile(model, backend="tilefx", options={"fallback": "never"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", tilefx.CoverageWarning)
        out = compiled(X)
    torch.testing.assert_close(out, model(X), rtol=1e-5, atol=1e-5)
    assert kernel_calls == ["BsrLinear", "BsrLinear"]


def test_backend_runs_the_recipe_like_optimize_then_compile() -> None:
    model = MLP().eval()
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(16, 1), sparsity=0.8, reorder="none"))
    expected = tilefx.optimize(model, (X,), recipe)(X)
    compiled = torch.compile(model, backend="tilefx", options={"recipe": recipe, "fallback": "never"})
    torch.testing.assert_close(compiled(X), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    "avx512vnni" not in compat.cpu_features(compat.make_target("llvm")), reason="CPU has no AVX512-VNNI"
)
def test_backend_with_a_quantization_recipe_runs_int8_kernels() -> None:
    model = MLP().eval()
    recipe = tilefx.Recipe(quantize=tilefx.Quantization())
    expected = tilefx.optimize(model, (X,), recipe)(X)
    calls: list[str] = []
    forward = NarrowLinear.forward

    def counted(self: NarrowLinear, x: torch.Tensor) -> torch.Tensor:
        calls.append(self.number_format)
        return forward(self, x)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NarrowLinear, "forward", counted)
        compiled = torch.compile(model, backend="tilefx", options={"recipe": recipe})
        with warnings.catch_warnings():
            warnings.simplefilter("error", tilefx.CoverageWarning)
            out = compiled(X)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert calls == ["int8", "int8"]


def test_an_unsupported_graph_runs_eager_with_exactly_one_warning_naming_why() -> None:
    model = _block_pruned(torch.float64)  # block-sparse kernels are float32 only
    x = X.double()
    compiled = torch.compile(model, backend="tilefx", options={"fallback": "never"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x)
    ours = [w for w in caught if issubclass(w.category, tilefx.CoverageWarning)]
    assert len(ours) == 1
    assert "runs eager torch: LoweringError" in str(ours[0].message)
    assert "float32" in str(ours[0].message)
    torch.testing.assert_close(out, model(x))


def test_a_compiled_graph_that_fails_at_run_time_falls_back_once() -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("kernel exploded")

    def eager(x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x + 1,)

    guarded = dynamo_backend._Guarded(broken, [0], eager, "graph")  # type: ignore[arg-type]
    with pytest.warns(tilefx.CoverageWarning, match="kernel exploded") as caught:
        assert torch.equal(guarded(X)[0], X + 1)
        assert torch.equal(guarded(X)[0], X + 1)
    assert len(caught) == 1


def test_unknown_options_are_a_recipe_error() -> None:
    with pytest.raises(tilefx.RecipeError, match="unknown option 'fallbak'"):
        dynamo_backend.check_options({"fallbak": "never"})
    with pytest.raises(tilefx.RecipeError, match="must be a tilefx.Recipe"):
        dynamo_backend.check_options({"recipe": {"blocks": None}})
    compiled = torch.compile(MLP().eval(), backend="tilefx", options={"fallbak": "never"})
    with pytest.raises(Exception, match="unknown option 'fallbak'"):
        compiled(X)


def test_registered_by_name_and_as_an_entry_point() -> None:
    assert "tilefx" in torch._dynamo.list_backends()
    dynamo_backend.register()  # a second registration is a no-op, not Dynamo's duplicate error
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    entry = project["project"]["entry-points"]["torch_dynamo_backends"]["tilefx"]
    assert entry == "tilefx.dynamo_backend:tilefx_backend"
