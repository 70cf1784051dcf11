"""Pass infrastructure: PassBase/PassResult, PassManager, AnalysisManager, instruments, verification.

The errors every layer raises live in :mod:`tilefx.errors`, which imports nothing.
"""

from __future__ import annotations

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
    "DumpGraphInstrument",
    "Instrument",
    "Numerics",
    "PassBase",
    "PassCheck",
    "PassManager",
    "PassResult",
    "PassTiming",
    "PipelineResult",
    "PrintAfterChangeInstrument",
    "TimingInstrument",
    "VerifyInstrument",
    "assert_outputs_close",
    "lint",
    "require_aten_graph",
    "run_checked",
]
