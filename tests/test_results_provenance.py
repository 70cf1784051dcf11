"""Every measured figure the repo states must be reproducible: each results file under
``benchmarks/results/`` names the command that produced it and the commit it measured."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
COMMAND = re.compile(r"(python|make) [^\n]*benchmarks/|make demo|python -m tilefx")
COMMIT = re.compile(r"[Cc]ommits?:? `?[0-9a-f]{7,40}")


def _result_files() -> list[Path]:
    return sorted(p for p in RESULTS.glob("*.md") if p.name != "README.md") + sorted(RESULTS.glob("*.txt"))


@pytest.mark.parametrize("path", _result_files(), ids=lambda p: p.name)
def test_results_file_names_its_command_and_commit(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert COMMAND.search(text), f"{path.name} does not name the command that produced it"
    assert COMMIT.search(text), f"{path.name} does not name the commit it measured"


def test_there_are_results_to_check() -> None:
    assert len(_result_files()) >= 10
