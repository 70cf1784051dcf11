"""Determinism: the same model, inputs, recipe and seed give bit-identical results in two processes.

Each process (``tests/pipeline_fingerprint.py``) optimizes and compiles two fixed models and prints
hashes of every pruned weight, sparsity mask, channel selection, permutation, the graph code, the
pruned and compiled outputs and the kernel cache keys. The processes differ in ``PYTHONHASHSEED``
(so set and dict ordering of strings differs) and share one kernel cache directory: the second
finds every kernel the first built under the same key, so it loads them instead of building more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _fingerprint(cache: Path, hash_seed: str) -> dict[str, str]:
    env = {**os.environ, "TILEFX_CACHE_DIR": str(cache), "PYTHONHASHSEED": hash_seed}
    done = subprocess.run(
        [sys.executable, "-m", "tests.pipeline_fingerprint"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, str] = json.loads(done.stdout)
    assert result.pop("python_hash_seed") == hash_seed
    return result


@pytest.mark.slow
def test_two_processes_give_bit_identical_results_and_cache_keys(tmp_path: Path) -> None:
    first = _fingerprint(tmp_path, "1")
    second = _fingerprint(tmp_path, "2")
    differing = sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))
    assert not differing, f"differ between processes: {differing}"
    assert any("/kernel_key/" in k for k in first), "nothing was lowered"
    assert any("/records/" in k and "Permutation" in v for k, v in first.items()), "nothing was reordered"
    assert first["kernel_files"], "no kernel was cached on disk"
