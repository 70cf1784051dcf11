"""Test-wide fixtures: every pipeline built in a test verifies every pass, whatever it asked for."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tilefx.passes.infra.manager import PassManager


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
