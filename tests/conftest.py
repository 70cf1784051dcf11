"""Test-wide fixtures: every pipeline built in a test verifies every pass, whatever it asked for.

Under pytest-xdist (``make test`` runs ``-n 2``) each worker gets an equal share of the cores for
torch and TVM, so workers do not oversubscribe the machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tilefx.passes.infra.manager import PassManager

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ["TVM_NUM_THREADS"] = str(_THREADS)  # read when TVM's thread pool starts


@pytest.fixture(autouse=True)
def _always_verify(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    original = PassManager.__init__

    def init(
        self: PassManager, passes: Any, instruments: Any = (), verify: bool = True, tolerance: float = 1e-5
    ) -> None:
        original(self, passes, instruments, True, tolerance)

    monkeypatch.setattr(PassManager, "__init__", init)
    yield


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    # Registered here, not in pyproject.toml, whose every change re-runs `make install`.
    config.addinivalue_line(
        "markers", "exhaustive: the 1,000-graph property run (tens of minutes); only make test-slow runs it"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
