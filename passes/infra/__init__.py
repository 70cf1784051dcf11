"""Pass infrastructure: PassBase/PassResult, PassManager, AnalysisManager, instruments, errors.

The errors are imported eagerly (they need nothing); the rest imports torch and is loaded on
first use (PEP 562), so ``tilefx.runtime`` can raise tilefx errors where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CaptureError,
    LoweringError,
    OptimizeError,
    PassError,
    PreconditionError,
    RecipeError,
    UnsupportedOpError,
    VerificationError,
)

if TYPE_CHECKING:
    from .analysis_manager import Analysis, AnalysisManager
    from .instruments import (
        DumpGraphInstrument,
        Instrument,
        PassTiming,
        PrintAfterChangeInstrument,
        TimingInstrument,
    )
    from .manager import PassManager, PipelineResult
    from .pass_base import Numerics, PassBase, PassResult
    from .preconditions import require_aten_graph
    from .verify import PassCheck, VerifyInstrument, assert_outputs_close, lint, run_checked

__all__ = [
    "Analysis",
    "AnalysisManager",
    "CaptureError",
    "DumpGraphInstrument",
    "Instrument",
    "LoweringError",
    "Numerics",
    "OptimizeError",
    "PassBase",
    "PassError",
    "PassManager",
    "PassTiming",
    "PassResult",
    "PipelineResult",
    "PreconditionError",
    "PrintAfterChangeInstrument",
    "RecipeError",
    "TimingInstrument",
    "UnsupportedOpError",
    "VerificationError",
    "PassCheck",
    "VerifyInstrument",
    "assert_outputs_close",
    "lint",
    "require_aten_graph",
    "run_checked",
]

_LAZY = {
    "Analysis": "analysis_manager",
    "AnalysisManager": "analysis_manager",
    "DumpGraphInstrument": "instruments",
    "Instrument": "instruments",
    "PassTiming": "instruments",
    "PrintAfterChangeInstrument": "instruments",
    "TimingInstrument": "instruments",
    "PassManager": "manager",
    "PipelineResult": "manager",
    "Numerics": "pass_base",
    "PassBase": "pass_base",
    "PassResult": "pass_base",
    "require_aten_graph": "preconditions",
    "PassCheck": "verify",
    "VerifyInstrument": "verify",
    "assert_outputs_close": "verify",
    "lint": "verify",
    "run_checked": "verify",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
