"""Capture: normalise any model into the one IR, the ATen-level fx graph of ``torch.export``.

Why torch.export and not ``symbolic_trace``: it captures models that fx tracing cannot (e.g.
transformers' BERT), its op set is finite (one handler per ATen op), and TVM imports it correctly.
The captured graph never shares a tensor with the caller's model, so no pass can mutate it.
"""

from __future__ import annotations

import copy
import itertools
import logging
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.export._unlift import _StatefulGraphModule

from tilefx.errors import CaptureError

__all__ = ["capture", "check_capturable", "check_finite"]

log = logging.getLogger(__name__)

# (substring of torch.export's error, the construct it means, the fix to suggest)
_KNOWN_FAILURES: tuple[tuple[str, str, str], ...] = (
    (
        "data-dependent",
        "data-dependent control flow or shapes (a Python branch or size that depends on tensor values)",
        "make the branch static, or express it with torch.cond / torch.where",
    ),
    (
        "Could not guard on data-dependent",
        "data-dependent control flow (a Python branch on a tensor value)",
        "make the branch static, or express it with torch.cond / torch.where",
    ),
    (
        "Dynamic control flow",
        "dynamic control flow",
        "express the branch with torch.cond or make it depend only on shapes",
    ),
    (
        "which is not a known type",
        "an input or output object torch.export cannot flatten (e.g. a transformers cache)",
        "return plain tensors (transformers: config.use_cache=False) or register the type with torch.utils._pytree",
    ),
    (
        "not supported",
        "a construct torch.export does not support",
        "rewrite that part of forward() in plain tensor ops, or wrap it in a custom op",
    ),
)


def capture(model: torch.nn.Module, example_inputs: Sequence[Any]) -> torch.fx.GraphModule:
    """Return an ATen-level GraphModule of ``model`` in eval mode, owning copies of every tensor.

    Accepts an ``nn.Module``, a ``torch.export(...).module()`` graph, or a ``symbolic_trace``
    GraphModule (re-exported). Raises :class:`CaptureError` naming the model and the construct.
    """
    check_capturable(model)
    inputs = _as_tuple(example_inputs)
    gm: torch.fx.GraphModule
    if isinstance(model, _StatefulGraphModule):
        gm = copy.deepcopy(model)  # already ATen-level; its BN mode was fixed when it was exported
    else:
        gm = copy.deepcopy(_export(model, inputs))
    _drop_input_guards(gm)
    return gm


def check_capturable(model: object) -> None:
    """Refuse what is not a model with data: a function or None, or weights on the meta device."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(
            f"expected a torch.nn.Module or fx.GraphModule, got {type(model).__name__}: "
            "pass the model object, not a function or a factory"
        )
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_meta:
            raise CaptureError(
                f"parameter {name!r} is on the meta device (it has a shape but no values); load real "
                "weights first, e.g. model.to_empty(device='cpu') then model.load_state_dict(...)"
            )


def check_finite(model: torch.nn.Module) -> None:
    """Refuse NaN/inf parameters and buffers: pruning scores and verification would be meaningless."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CaptureError(
                f"parameter {name!r} has {bad} non-finite value(s) (NaN or inf); fix the weights first"
            )


def _as_tuple(example_inputs: Sequence[Any]) -> tuple[Any, ...]:
    """The inputs as a tuple; verification runs the model on them, so they must hold real numbers."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise CaptureError(
            f"example_inputs must be a tuple of model inputs, got {type(example_inputs).__name__}; "
            "write example_inputs=(x,)"
        )
    for index, tensor in enumerate(example_inputs):
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.is_meta:
            raise CaptureError(f"example_inputs[{index}] is on the meta device; give a tensor with values")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CaptureError(
                f"example_inputs[{index}] has non-finite values (NaN or inf); verification compares "
                "outputs on these inputs, so give finite ones"
            )
    return tuple(example_inputs)


def _export(model: torch.nn.Module, inputs: tuple[Any, ...]) -> torch.fx.GraphModule:
    modes = {m: m.training for m in model.modules()}
    if any(modes.values()):
        log.info("capturing %s in eval mode (tilefx compiles for inference)", type(model).__name__)
    model.eval()
    try:
        return torch.export.export(model, inputs, strict=False).module()
    except Exception as exc:
        raise CaptureError(_explain(model, exc)) from exc
    finally:
        for module, training in modes.items():
            module.training = training


def _explain(model: torch.nn.Module, exc: Exception) -> str:
    text = str(exc)
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    construct, fix = "a construct torch.export could not trace", "see the torch.export error below"
    for needle, what, how in _KNOWN_FAILURES:
        if needle.lower() in text.lower():
            construct, fix = what, how
            break
    return (
        f"cannot capture {type(model).__name__} with torch.export: {construct}{_user_frame(exc)}. "
        f"Fix: {fix}. torch.export said: {type(exc).__name__}: {first_line}"
    )


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch, i.e. the user's line that failed."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "/torch/" not in f.filename and not f.filename.startswith("<")
    ]
    frames = [f for f in frames if not f.filename.endswith("tilefx/capture.py")]
    return f" at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""


def _drop_input_guards(gm: torch.fx.GraphModule) -> None:
    """Remove export's ``_guards_fn`` call: input shapes are checked by our own verification."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()
