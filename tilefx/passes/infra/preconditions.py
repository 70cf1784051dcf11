"""Checks shared by several passes' ``requires``: what "an ATen-level graph" means, tested."""

from __future__ import annotations

import torch
import torch.fx

from tilefx.errors import PreconditionError

__all__ = ["require_aten_graph"]

# Python-level helpers torch.export leaves between ATen ops (tuple indexing, symbolic sizes).
_HELPER_MODULES = frozenset({"_operator", "operator", "builtins", "math"})
_EXPORT_GUARDS = "_guards_fn"  # torch.export's input check, a call_module in .module() graphs


def require_aten_graph(pass_name: str, gm: torch.fx.GraphModule) -> None:
    """Every call is an ATen op (or a Python helper export leaves), never a submodule or torch function.

    A ``symbolic_trace`` graph calls ``nn.Conv2d`` modules and ``torch.nn.functional``: a pass that
    looks for ``aten.conv2d`` would find nothing and silently do nothing.
    """
    for node in gm.graph.nodes:
        module = node.op == "call_module" and node.target != _EXPORT_GUARDS
        if module or (node.op == "call_function" and not _is_aten_level(node.target)):
            raise PreconditionError(
                pass_name,
                node.name,
                f"calls {node.target!r}: the pass needs an ATen-level graph",
                "capture the model with tilefx.capture (torch.export) first",
            )


def _is_aten_level(target: object) -> bool:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return True
    name = str(getattr(target, "__name__", ""))
    return getattr(target, "__module__", None) in _HELPER_MODULES or name.startswith("sym_")
