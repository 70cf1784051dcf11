"""Lowering depends on the runtime, never the other way round (``tilefx/runtime/__init__.py``)."""

from __future__ import annotations

import subprocess
import sys


def test_runtime_imports_neither_lowering_nor_tvm() -> None:
    code = (
        "import sys\n"
        "import tilefx.runtime.layout, tilefx.runtime.packing, tilefx.runtime.sparse_modules\n"
        "found = sorted(m for m in sys.modules if m.startswith('tilefx.lowering') or m.split('.')[0] == 'tvm')\n"
        "assert not found, found\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
