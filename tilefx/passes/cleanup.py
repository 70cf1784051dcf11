"""Remove what no output depends on: dead nodes, then parameters, buffers and modules nobody reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx

from .infra.analysis_manager import AnalysisManager
from .infra.pass_base import Numerics, PassBase, PassResult
from .infra.preconditions import require_aten_graph

__all__ = ["EliminateDeadCodePass"]


@dataclass(frozen=True)
class EliminateDeadCodePass(PassBase):
    """Dead-code elimination over nodes *and* state, so a pruned model also saves memory.

    Impure nodes (in-place ops, RNG) are kept, as fx's own DCE decides. Exact by construction.
    Requires: an ATen-level graph, whose state is read by ``get_attr`` only (a submodule call
    reads parameters this pass cannot see and would delete).
    """

    numerics: ClassVar[Numerics] = "exact"

    def requires(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> None:
        require_aten_graph(self.name, gm)

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        changed = gm.graph.eliminate_dead_code()
        if changed:
            gm.recompile()
        return PassResult(gm, modified=_drop_unread_state(gm) or changed)


def _drop_unread_state(gm: torch.fx.GraphModule) -> bool:
    read = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    tensors = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    unread = [name for name, _ in tensors if name not in read]
    for name in unread:
        _delete(gm, name)
    empty = [
        name
        for name, module in gm.named_modules(remove_duplicate=False)
        if name
        and next(module.parameters(), None) is None
        and next(module.buffers(), None) is None
        and not any(t == name or t.startswith(name + ".") for t in read)
    ]
    for name in sorted(empty, key=len, reverse=True):
        _delete(gm, name)
    return bool(unread or empty)


def _delete(gm: torch.fx.GraphModule, name: str) -> None:
    owner, _, attr = name.rpartition(".")
    parent = gm.get_submodule(owner) if owner else gm
    if hasattr(parent, attr):
        delattr(parent, attr)
