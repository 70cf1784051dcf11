"""tilefx: a pruning compiler for PyTorch.

``optimize`` captures a model with torch.export and runs verified fx passes that prune and
reorder it; ``compile`` lowers the result to TVM block-sparse kernels called from torch.
"""

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
from tilefx.passes.training.vrpge import VRPGEOptions  # registers the channel criterion "vrpge"

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
    "VRPGEOptions",
    "VerificationError",
    "capture",
    "compile",
    "default_pipeline",
    "optimize",
]
