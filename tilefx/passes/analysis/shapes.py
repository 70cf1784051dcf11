"""Shape propagation as an analysis: every node's output shape on the pipeline's example inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from tilefx.errors import VerificationError

from ..infra.analysis_manager import Analysis, AnalysisManager
from ..infra.verify import run_checked

__all__ = ["Shapes"]


@dataclass(frozen=True)
class Shapes(Analysis[dict[str, tuple[int, ...]]]):
    """Maps node name → output shape (tensor-valued nodes only), by running on the example inputs.

    Running real inputs (rather than trusting stale ``meta['val']``) is what makes shape checks
    after a shrinking pass meaningful. Requires: the AnalysisManager holds example inputs.
    """

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> dict[str, tuple[int, ...]]:
        if not am.example_inputs:
            raise VerificationError("Shapes needs example inputs; pass example_inputs to the PassManager")
        run_checked(gm, am.example_inputs, "shape propagation")
        return {
            n.name: tuple(n.meta["val"].shape)
            for n in gm.graph.nodes
            if isinstance(n.meta.get("val"), torch.Tensor)
        }
