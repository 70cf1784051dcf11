"""The prunable weights of an ATen-level graph: get_attr weights feeding ``aten.linear`` / ``aten.conv2d``.

Read-only. Layers are listed in graph (topological) order, which is what "first" and "last" layer
mean for layer-selection options. A weight shared by several layers is listed once, at its first use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx

from ..infra.errors import RecipeError

__all__ = ["LayerPlan", "LayerSelection", "WeightLayer", "weight_layers"]

_LINEAR = torch.ops.aten.linear.default
_CONV = torch.ops.aten.conv2d.default


@dataclass(frozen=True)
class WeightLayer:
    """One prunable weight: the op node using it, the parameter's qualified name, and its layout."""

    node: torch.fx.Node
    param: str
    kind: Literal["linear", "conv"]
    shape: tuple[int, ...]
    groups: int = 1

    @property
    def kernel(self) -> int:
        """kh·kw for a conv, 1 for a linear: the matrix-view columns per input channel."""
        return math.prod(self.shape[2:])

    @property
    def input(self) -> torch.fx.Node:
        arg = self.node.args[0]
        assert isinstance(arg, torch.fx.Node)
        return arg


def weight_layers(gm: torch.fx.GraphModule) -> list[WeightLayer]:
    layers: list[WeightLayer] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (_LINEAR, _CONV) or len(node.args) < 2:
            continue
        weight = node.args[1]
        if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr" or weight.target in seen:
            continue
        seen.add(str(weight.target))
        tensor = _tensor(gm, str(weight.target))
        kind: Literal["linear", "conv"] = "linear" if node.target == _LINEAR else "conv"
        groups = int(_arg(node, 6, "groups", 1)) if kind == "conv" else 1  # type: ignore[call-overload]
        layers.append(WeightLayer(node, str(weight.target), kind, tuple(tensor.shape), groups))
    return layers


def _arg(node: torch.fx.Node, index: int, name: str, default: object) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _tensor(gm: torch.fx.GraphModule, name: str) -> torch.Tensor:
    try:
        return gm.get_parameter(name)
    except AttributeError:
        return gm.get_buffer(name)


@dataclass(frozen=True)
class LayerPlan:
    """What a pruning pass will do to one weight: its sparsity (None = left dense) and why."""

    param: str
    sparsity: float | None
    reason: str


@dataclass(frozen=True)
class LayerSelection:
    """Which weight layers a pruning pass touches, and at what sparsity.

    ``per_layer`` maps a parameter name (e.g. ``"layer1.0.conv1.weight"``) to its own sparsity and
    overrides the pass's; a mapping given here is stored as sorted pairs so the options stay hashable.
    ``skip_first`` / ``skip_last`` leave the first / last layer in graph order dense; ``min_size``
    leaves weights with fewer elements dense; ``kinds`` restricts to linears or convs.
    """

    skip_first: bool = False
    skip_last: bool = False
    min_size: int = 0
    kinds: tuple[str, ...] = ("linear", "conv")
    per_layer: tuple[tuple[str, float], ...] | Mapping[str, float] = ()

    def __post_init__(self) -> None:
        if isinstance(self.per_layer, Mapping):
            object.__setattr__(self, "per_layer", tuple(sorted(self.per_layer.items())))

    def choose(
        self, layers: Sequence[WeightLayer], sparsity: float
    ) -> list[tuple[WeightLayer, float | None, str]]:
        """Per layer: (layer, sparsity or None when skipped, reason)."""
        overrides = dict(self.per_layer)
        unknown = set(overrides) - {layer.param for layer in layers}
        if unknown:
            raise RecipeError(f"per_layer names no linear/conv weight: {sorted(unknown)}")
        out: list[tuple[WeightLayer, float | None, str]] = []
        for index, layer in enumerate(layers):
            reason = self._skip_reason(index, len(layers), layer)
            out.append(
                (layer, None, reason) if reason else (layer, overrides.get(layer.param, sparsity), "selected")
            )
        return out

    def _skip_reason(self, index: int, count: int, layer: WeightLayer) -> str:
        if layer.kind not in self.kinds:
            return f"kind {layer.kind} not selected"
        if self.skip_first and index == 0:
            return "first layer (skip_first)"
        if self.skip_last and index == count - 1:
            return "last layer (skip_last)"
        if math.prod(layer.shape) < self.min_size:
            return f"{math.prod(layer.shape)} elements < min_size {self.min_size}"
        return ""
