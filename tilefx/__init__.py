"""tilefx: a pruning compiler for PyTorch.

``optimize`` captures a model with torch.export and runs verified fx passes that prune and
reorder it; ``compile`` lowers the result to TVM block-sparse kernels called from torch.
"""

import sys as _sys

from tilefx.passes.coverage import CoverageWarning
from tilefx.passes.infra.errors import (
    CaptureError,
    LoweringError,
    OptimizeError,
    PassError,
    PreconditionError,
    RecipeError,
    UnsupportedOpError,
    VerificationError,
)
from tilefx.passes.training.dcp import DCPOptions  # importing DCP registers the channel criterion "dcp"

from .api import compile, optimize
from .capture import capture
from .pipeline import default_pipeline
from .recipe import BlockPruning, ChannelPruning, ConnectionPruning, Recipe, Recovery

__version__ = "0.1.0"

__all__ = [
    "BlockPruning",
    "CaptureError",
    "ChannelPruning",
    "ConnectionPruning",
    "CoverageWarning",
    "DCPOptions",
    "LoweringError",
    "OptimizeError",
    "PassError",
    "PreconditionError",
    "Recipe",
    "RecipeError",
    "Recovery",
    "UnsupportedOpError",
    "VerificationError",
    "capture",
    "compile",
    "default_pipeline",
    "optimize",
]

# backend="tilefx" for torch.compile where the entry point is not installed (an editable checkout).
# Only when torch is loaded already, so importing tilefx for the torch-free runtime never loads it.
if "torch" in _sys.modules:
    from .dynamo_backend import register as _register_dynamo_backend

    _register_dynamo_backend()
