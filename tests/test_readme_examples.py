"""Every ```python example in README.md runs and does what it asks for.

What an example asks for is read off what it built: a graph whose recipe asks for blocks has
block-sparse weights in every layer the block tiles (and a ``CoverageWarning`` naming each one it
does not); a graph whose recipe prunes channels has fewer parameters than the model it came from;
a compiled graph lowered its block-sparse layers. The fast test swaps ResNet-50 for ResNet-18 and
lowers every layer (``fallback="never"``), so nothing in it is timed; the slow test runs the
README verbatim and checks, with medians and a margin, that the compiled model is faster than the
pruned one on the example's own input.
"""

from __future__ import annotations

import functools
import re
import statistics
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

import tilefx
from tilefx.passes.analysis.weight_layers import weight_layers
from tilefx.passes.coverage import CoverageWarning
from tilefx.passes.metadata import BlockSparsity, get_metadata
from tilefx.report import count_parameters
from tilefx.timing import interleaved_times

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def _run(code: str, index: int) -> tuple[dict[str, Any], list[str]]:
    """Run one example; its variables and the CoverageWarnings it raised."""
    namespace: dict[str, Any] = {"__name__": f"readme_example_{index}"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CoverageWarning)
        exec(compile(code, f"README.md example {index}", "exec"), namespace)  # noqa: S102
    return namespace, [str(w.message) for w in caught if issubclass(w.category, CoverageWarning)]


def _optimized(namespace: dict[str, Any]) -> list[torch.fx.GraphModule]:
    return [
        v
        for v in namespace.values()
        if isinstance(v, torch.fx.GraphModule) and "lowering_choices" not in v.meta
    ]


def _compiled(namespace: dict[str, Any]) -> list[torch.fx.GraphModule]:
    return [
        v for v in namespace.values() if isinstance(v, torch.fx.GraphModule) and "lowering_choices" in v.meta
    ]


def _check_asked_for(namespace: dict[str, Any], coverage: list[str]) -> None:
    originals = [v for v in namespace.values() if isinstance(v, torch.nn.Module) and not hasattr(v, "graph")]
    for gm in _optimized(namespace):
        recipe = get_metadata(gm).recipe
        assert recipe is not None
        if recipe.channels is not None:
            assert all(count_parameters(gm) < count_parameters(m) for m in originals)
        if recipe.blocks is None:
            continue
        sparse = {
            p
            for p, records in get_metadata(gm).params.items()
            if any(isinstance(r, BlockSparsity) for r in records)
        }
        dense = [layer.param for layer in weight_layers(gm) if layer.param not in sparse]
        assert sparse, "the block recipe pruned no layer"
        for param in dense:  # every layer left dense is named in a warning, with its reason
            assert any(f"{param} " in text and "does not divide" in text for text in coverage), param


@pytest.mark.parametrize("index", range(len(_examples())))
def test_readme_example_does_what_it_asks(monkeypatch: pytest.MonkeyPatch, index: int) -> None:
    # ResNet-18 keeps this under a minute on 2 cores; "never" lowers every block-sparse layer
    # instead of timing each against dense, so the test asserts structure, not speed.
    monkeypatch.setattr(torchvision.models, "resnet50", torchvision.models.resnet18)
    monkeypatch.setattr(tilefx, "compile", functools.partial(tilefx.compile, fallback="never"))
    namespace, coverage = _run(_examples()[index], index)
    _check_asked_for(namespace, coverage)
    inputs = [v for v in namespace.values() if isinstance(v, torch.Tensor)]
    for compiled in _compiled(namespace):
        choices = compiled.meta["lowering_choices"]
        assert choices and all(c.lowered for c in choices)
        pruned = next(
            g for g in _optimized(namespace) if get_metadata(g).recipe == get_metadata(compiled).recipe
        )
        with torch.no_grad():
            torch.testing.assert_close(compiled(*inputs), pruned(*inputs), rtol=1e-4, atol=1e-4)


def _median_ms(models: dict[str, torch.nn.Module], x: torch.Tensor) -> dict[str, float]:
    """Medians of calls interleaved round-robin, so load from other processes hits both alike."""
    times = interleaved_times(
        {name: functools.partial(model, x) for name, model in models.items()}, rounds=15
    )
    return {name: statistics.median(ms) for name, ms in times.items()}


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_examples())))
def test_readme_example_verbatim_compiles_faster_than_pruned(index: int) -> None:
    namespace, coverage = _run(_examples()[index], index)
    _check_asked_for(namespace, coverage)
    x = next(v for v in namespace.values() if isinstance(v, torch.Tensor))
    for compiled in _compiled(namespace):
        choices = compiled.meta["lowering_choices"]
        assert sum(c.lowered for c in choices) >= len(choices) // 2, [c.describe() for c in choices]
        pruned = next(
            g for g in _optimized(namespace) if get_metadata(g).recipe == get_metadata(compiled).recipe
        )
        ms = _median_ms({"pruned": pruned, "compiled": compiled}, x)
        assert ms["compiled"] < 0.9 * ms["pruned"], ms
