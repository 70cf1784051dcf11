"""tilefx: a pruning compiler for PyTorch.

``optimize`` captures a model with torch.export and runs verified fx passes that prune and
reorder it; ``compile`` lowers the result to TVM block-sparse kernels called from torch.

The names below whose modules import torch are loaded on first use (PEP 562), so that
``tilefx.runtime`` (which runs an exported artifact) can be imported where torch is not.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from tilefx._version import __version__ as __version__
from tilefx.errors import (
    ArtifactError,
    ArtifactInputError,
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
    from tilefx.gan_training import GANCompressionOptions
    from tilefx.passes.coverage import CoverageWarning
    from tilefx.passes.criteria.dcp import DCPOptions
    from tilefx.passes.criteria.vrpge import VRPGEOptions

    from .api import compile, optimize
    from .export_artifact import export
    from .gan import compress_gan
    from .graph_capture import capture
    from .pipeline import default_pipeline
    from .recipe import (
        BlockPruning,
        ChannelPruning,
        ConnectionPruning,
        DirichletScaleMixture,
        Quantization,
        Recipe,
        Recovery,
    )


__all__ = [
    "ArtifactError",
    "ArtifactInputError",
    "BlockPruning",
    "CaptureError",
    "ChannelPruning",
    "ConnectionPruning",
    "CoverageWarning",
    "DCPOptions",
    "DirichletScaleMixture",
    "GANCompressionOptions",
    "LoweringError",
    "OptimizeError",
    "PassError",
    "PreconditionError",
    "Quantization",
    "Recipe",
    "RecipeError",
    "Recovery",
    "UnsupportedOpError",
    "VRPGEOptions",
    "VerificationError",
    "capture",
    "compile",
    "compress_gan",
    "default_pipeline",
    "export",
    "optimize",
]

#: Public names that need torch, and the module each comes from.
_TORCH_SIDE = {
    "BlockPruning": "tilefx.recipe",
    "ChannelPruning": "tilefx.recipe",
    "ConnectionPruning": "tilefx.recipe",
    "CoverageWarning": "tilefx.passes.coverage",
    "DCPOptions": "tilefx.passes.criteria.dcp",
    "DirichletScaleMixture": "tilefx.recipe",
    "GANCompressionOptions": "tilefx.gan_training",
    "Quantization": "tilefx.recipe",
    "Recipe": "tilefx.recipe",
    "Recovery": "tilefx.recipe",
    "VRPGEOptions": "tilefx.passes.criteria.vrpge",
    "capture": "tilefx.graph_capture",
    "compile": "tilefx.api",
    "compress_gan": "tilefx.gan",
    "default_pipeline": "tilefx.pipeline",
    "export": "tilefx.export_artifact",
    "optimize": "tilefx.api",
}


def __getattr__(name: str) -> Any:
    module = _TORCH_SIDE.get(name)
    if module is None:
        raise AttributeError(f"module 'tilefx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TORCH_SIDE))


# backend="tilefx" for torch.compile where the entry point is not installed (an editable checkout).
# Only when torch is loaded already, so importing tilefx for the torch-free runtime never loads it.
if sys.modules.get("torch") is not None:
    from tilefx.dynamo_backend import register as _register_dynamo_backend

    _register_dynamo_backend()
