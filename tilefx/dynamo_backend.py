"""The ``torch.compile`` backend: ``torch.compile(model, backend="tilefx", options={...})``.

Dynamo hands over torch-level graphs whose parameters are lifted to placeholders (their values
in ``example_inputs``). Each graph is turned back into a module that owns those parameters and
buffers, so it goes through the same path as any model: ``tilefx.optimize`` with the recipe
(which captures it with torch.export to the ATen IR the passes and the plan expect), or capture
alone without one, then ``tilefx.compile`` (which detects block sparsity already in the weights).

A graph the pipeline cannot handle runs eager, as Dynamo gave it, with one ``CoverageWarning``
naming why: a backend never raises in the user's forward. Weights are read once, at compile
time (inference). Bad ``options`` are a ``RecipeError`` (Dynamo wraps it in
``BackendCompilerFailed``). Registered as ``"tilefx"`` on import and through the
``torch_dynamo_backends`` entry point.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from typing import Any

import torch
import torch.fx
from torch._dynamo.backends import registry

from tilefx.errors import RecipeError
from tilefx.passes.coverage import CoverageWarning

from .api import compile, optimize
from .recipe import Recipe

__all__ = ["BACKEND_NAME", "check_options", "register", "tilefx_backend"]

log = logging.getLogger(__name__)

BACKEND_NAME = "tilefx"
_COMPILE_OPTIONS = ("target", "fallback", "cache_dir", "fuse_activations", "hand_over")
_OPTIONS = ("recipe", *_COMPILE_OPTIONS)
_STATE_PATH = re.compile(r"_(?:modules|parameters|buffers)\['([^']*)'\]")

CompiledFn = Callable[..., Any]


def tilefx_backend(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None
) -> CompiledFn:
    """Compile one Dynamo graph; on anything it cannot handle, run it eager with one warning."""
    options = dict(options or {})
    check_options(options)
    where = f"tilefx torch.compile backend, graph of {_count_ops(gm)} ops"
    try:
        compiled, user_inputs = _compile_graph(gm, example_inputs, options)
    except Exception as exc:  # noqa: BLE001 - the contract: fall back, never fail the forward
        _warn_fallback(where, exc)
        return gm.forward
    if compiled is None:
        return gm.forward
    return _Guarded(compiled, user_inputs, gm, where)


def check_options(options: Mapping[str, Any]) -> None:
    """Raise ``RecipeError`` for an option the backend does not know or a recipe of the wrong type."""
    for key in options:
        if key not in _OPTIONS:
            raise RecipeError(
                f"torch.compile(backend='tilefx'): unknown option {key!r}; options: {', '.join(_OPTIONS)}"
            )
    recipe = options.get("recipe")
    if recipe is not None and not isinstance(recipe, Recipe):
        raise RecipeError(
            f"torch.compile(backend='tilefx'): options['recipe'] must be a tilefx.Recipe, got {type(recipe).__name__}"
        )


def register() -> None:
    """Register ``"tilefx"`` with Dynamo unless it is registered or an entry point will register it.

    Dynamo registers an entry-point backend itself on first lookup, and raises on a duplicate name.
    """
    if BACKEND_NAME in registry._COMPILER_FNS:
        return
    if metadata.entry_points(group="torch_dynamo_backends", name=BACKEND_NAME):
        return
    registry.register_backend(compiler_fn=tilefx_backend, name=BACKEND_NAME)


class _Guarded:
    """The compiled graph, called with the user inputs; if it ever raises, eager from then on."""

    def __init__(
        self, compiled: torch.nn.Module, user_inputs: Sequence[int], eager: torch.fx.GraphModule, where: str
    ):
        self.compiled: torch.nn.Module | None = compiled
        self.user_inputs = tuple(user_inputs)
        self.eager = eager
        self.where = where

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.eager(*args)
        try:
            return self.compiled(*(args[i] for i in self.user_inputs))
        except Exception as exc:  # noqa: BLE001 - the contract: fall back, never fail the forward
            _warn_fallback(f"{self.where}, at its first failing call", exc)
            self.compiled = None
            return self.eager(*args)


def _compile_graph(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any]
) -> tuple[torch.nn.Module | None, list[int]]:
    """The compiled module and the positions of the user inputs among Dynamo's, or None if no weights."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    dynamic = [
        n.name for n, v in zip(placeholders, example_inputs, strict=True) if not isinstance(v, torch.Tensor)
    ]
    if dynamic:
        raise ValueError(
            f"the graph has symbolic shape inputs {dynamic} (dynamic shapes); kernels are built per "
            "shape, so use torch.compile(..., dynamic=False)"
        )
    module, user_inputs = _module_with_state(gm, placeholders, example_inputs)
    if not any(True for _ in module.parameters()):
        log.info("graph without parameters: nothing to lower, runs eager")
        return None, user_inputs
    inputs = tuple(example_inputs[i] for i in user_inputs)
    recipe = options.get("recipe")
    compile_options = {key: options[key] for key in _COMPILE_OPTIONS if key in options}
    if recipe is None:
        return compile(module, inputs, **compile_options), user_inputs
    return compile(optimize(module, inputs, recipe), **compile_options), user_inputs


def _module_with_state(
    gm: torch.fx.GraphModule, placeholders: Sequence[torch.fx.Node], example_inputs: Sequence[Any]
) -> tuple[torch.fx.GraphModule, list[int]]:
    """A GraphModule reading lifted parameters and buffers through ``get_attr``; the user inputs' positions.

    Parameters are the ``nn.Parameter`` inputs, buffers those Dynamo read from a ``_buffers`` dict;
    everything else stays an input. They get their module paths (``fc1.weight``) as names.
    """
    root = torch.nn.Module()
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    user_inputs: list[int] = []
    for index, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        source = _source_name(node)
        is_buffer = "._buffers[" in source
        if not isinstance(value, torch.nn.Parameter) and not is_buffer:
            env[node] = graph.placeholder(node.name)
            user_inputs.append(index)
            continue
        name = _register(root, _state_name(source, node.name), value.detach(), is_buffer)
        env[node] = graph.get_attr(name)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    return torch.fx.GraphModule(root, graph, class_name="DynamoGraph"), user_inputs


def _source_name(node: torch.fx.Node) -> str:
    """Where Dynamo read the value, e.g. ``L['self']._modules['fc1']._parameters['weight']``."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", "")
    return str(name() if callable(name) else name)


def _state_name(source: str, fallback: str) -> str:
    parts = _STATE_PATH.findall(source)
    return ".".join(parts) if parts and all(p.isidentifier() or p.isdigit() for p in parts) else fallback


def _register(root: torch.nn.Module, name: str, value: torch.Tensor, is_buffer: bool) -> str:
    """Register ``value`` under the dotted ``name`` (creating submodules); returns the name used."""
    *path, leaf = name.split(".")
    owner = root
    for part in path:
        child = owner._modules.get(part)
        if child is None:
            child = torch.nn.Module()
            owner.add_module(part, child)
        owner = child
    if hasattr(owner, leaf):
        return _register(
            root, f"{name.replace('.', '_')}_{len(list(root.named_parameters()))}", value, is_buffer
        )
    if is_buffer:
        owner.register_buffer(leaf, value)
    else:
        owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    return name


def _count_ops(gm: torch.fx.GraphModule) -> int:
    return sum(node.op == "call_function" or node.op == "call_method" for node in gm.graph.nodes)


def _warn_fallback(where: str, exc: BaseException) -> None:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    warnings.warn(
        f"{where} runs eager torch: {type(exc).__name__}: {first_line}",
        CoverageWarning,
        stacklevel=3,
    )
