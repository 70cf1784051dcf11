"""tilefx works with only its runtime dependencies, what a plain ``pip install tilefx`` brings.

The dev and bench extras (scikit-learn, transformers, safetensors, torch-pruning, hypothesis, ...)
are installed here, so each check runs in a subprocess that first hides every installed
distribution outside the runtime closure (``[project].dependencies`` of pyproject.toml and their
requirements, recursively): importing one of them fails there as it would in a fresh environment.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised (``scikit_learn>=1`` -> ``scikit-learn``)."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match[0]).lower()


def _runtime_distributions() -> set[str]:
    """The runtime requirements and theirs, recursively (extras left out), plus what every venv has."""
    found = {"tilefx", "pip", "setuptools"}
    todo = [_name(r) for r in PYPROJECT["project"]["dependencies"]]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if not re.search(r"\bextra\s*==", r)]
    return found


def _hidden_modules() -> list[str]:
    """Top-level modules that only installed distributions outside the runtime closure provide."""
    runtime = _runtime_distributions()
    return sorted(
        module
        for module, dists in metadata.packages_distributions().items()
        if not any(_name(d) in runtime for d in dists)
    )


HIDDEN = _hidden_modules()


def _run_without_extras(code: str) -> str:
    """Run ``code`` in a fresh interpreter where the modules in HIDDEN cannot be imported."""
    hide = f"import sys\nfor _name in {HIDDEN!r}:\n    sys.modules[_name] = None\n"
    done = subprocess.run(
        [sys.executable, "-c", hide + code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.mark.parametrize("module", ["sklearn", "transformers", "safetensors", "torch_pruning", "hypothesis"])
def test_dev_and_bench_extras_are_hidden(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed here, so there is nothing to hide")
    assert module in HIDDEN, f"{module} is in the runtime closure of pyproject.toml's dependencies"


def test_every_module_imports_with_only_runtime_dependencies() -> None:
    code = """
import importlib, pkgutil
import tilefx
imported = ["tilefx"]
for info in pkgutil.walk_packages(tilefx.__path__, "tilefx."):
    importlib.import_module(info.name)
    imported.append(info.name)
print(len(imported))
"""
    modules = [path for path in (ROOT / "tilefx").rglob("*.py") if path.name != "__main__.py"]
    assert int(_run_without_extras(code)) == len(modules)


def test_tetris_block_pruning_runs_without_scikit_learn() -> None:
    code = """
import torch
import tilefx
from tilefx.passes.metadata import BlockSparsity, get_metadata

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
x = torch.randn(4, 16)
recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(4, 1), sparsity=0.5, reorder="tetris"))
pruned = tilefx.optimize(model, (x,), recipe=recipe)
sparse = [n for n, records in get_metadata(pruned).params.items() if any(isinstance(r, BlockSparsity) for r in records)]
assert sparse, "no weight was block-pruned"
assert "sklearn" not in sys.modules or sys.modules["sklearn"] is None
print(len(sparse))
"""
    assert int(_run_without_extras(code)) == 2
