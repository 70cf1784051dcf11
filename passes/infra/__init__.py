"""Pass infrastructure: PassBase/PassResult, PassManager, AnalysisManager, instruments, errors."""

from .analysis_manager import Analysis, AnalysisManager
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
from .verify import VerifyInstrument, assert_outputs_close, lint, run_checked

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
    "VerifyInstrument",
    "assert_outputs_close",
    "lint",
    "require_aten_graph",
    "run_checked",
]
