"""The prunable weights of an ATen-level graph: get_attr weights feeding ``aten.linear`` / ``aten.conv2d``.

With ``matmul_weights=True`` also a 2-D parameter that is the right operand of ``aten.addmm`` /
``aten.mm`` / ``aten.matmul``, a linear layer written another way: stored ``[in, out]`` and read
as is (transformers' ``Conv1D``: ``addmm(bias, x.view(-1, in), W)``, ``x @ W``), or stored
``[out, in]`` and read through a transpose (``x @ W.T``: ``t`` / ``numpy_T`` / ``transpose`` /
``permute``). Only passes that handle :attr:`WeightLayer.transposed` ask for them.

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

from tilefx.errors import RecipeError

from ..infra.analysis_manager import Analysis, AnalysisManager

__all__ = ["LayerPlan", "LayerSelection", "WeightLayer", "WeightLayers", "layer_of", "weight_layers"]

aten = torch.ops.aten
_LINEAR = aten.linear.default
_CONV = aten.conv2d.default
_ADDMM = aten.addmm.default
_MATMULS = (aten.mm.default, aten.matmul.default)
_TRANSPOSES = (aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default)


@dataclass(frozen=True)
class WeightLayer:
    """One prunable weight: the op node using it, the parameter's qualified name, and its layout.

    ``shape`` is the parameter as stored; ``transposed`` says the layer reads it as its transpose
    (stored ``[in, out]``), so its output channels are dim 1 and its input channels dim 0.
    """

    node: torch.fx.Node
    param: str
    kind: Literal["linear", "conv"]
    shape: tuple[int, ...]
    groups: int = 1
    transposed: bool = False

    @property
    def out_channels(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]

    @property
    def in_channels(self) -> int:
        """Input channels (per group for a grouped conv)."""
        return self.shape[0] if self.transposed else self.shape[1]

    def stored_block(self, block: tuple[int, int]) -> tuple[int, int]:
        """``block = (b_out, b_in)`` in channels, as a block of the stored parameter's matrix view."""
        if self.transposed:
            return block[1], block[0]
        return block[0], block[1] * self.kernel

    @property
    def kernel(self) -> int:
        """kh·kw for a conv, 1 for a linear: the matrix-view columns per input channel."""
        return math.prod(self.shape[2:])

    @property
    def input(self) -> torch.fx.Node:
        arg = self.node.args[1 if self.node.target == _ADDMM else 0]
        assert isinstance(arg, torch.fx.Node)
        return arg

    @property
    def conv_geometry(self) -> tuple[object, object, object]:
        """A conv's ``(stride, padding, dilation)`` as the node gives them (aten.conv2d's defaults
        when absent)."""
        return tuple(
            _arg(self.node, i, name, d)
            for i, name, d in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1))
        )  # type: ignore[return-value]

    @property
    def bias(self) -> torch.fx.Node | None:
        """The bias node (addmm's added term, a linear's / conv's bias), None without one."""
        arg = self.node.args[0] if self.node.target == _ADDMM else _arg(self.node, 2, "bias", None)
        return arg if isinstance(arg, torch.fx.Node) else None


def weight_layers(gm: torch.fx.GraphModule, *, matmul_weights: bool = False) -> list[WeightLayer]:
    """Every prunable weight once, at its first use; ``matmul_weights``: see the module docstring."""
    layers: list[WeightLayer] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        layer = layer_of(gm, node, matmul_weights=matmul_weights)
        if layer is None or layer.param in seen:
            continue
        seen.add(layer.param)
        layers.append(layer)
    return layers


def layer_of(
    gm: torch.fx.GraphModule, node: torch.fx.Node, *, matmul_weights: bool = True
) -> WeightLayer | None:
    """The weight layer ``node`` is, or None (not a linear / conv / matmul with a parameter)."""
    if node.op != "call_function" or len(node.args) < 2:
        return None
    if node.target in (_LINEAR, _CONV):
        weight = node.args[1]
        if not _is_attr(weight):
            return None
        tensor = _tensor(gm, str(weight.target))  # type: ignore[union-attr]
        kind: Literal["linear", "conv"] = "linear" if node.target == _LINEAR else "conv"
        groups = int(_arg(node, 6, "groups", 1)) if kind == "conv" else 1  # type: ignore[call-overload]
        return WeightLayer(node, str(weight.target), kind, tuple(tensor.shape), groups)  # type: ignore[union-attr]
    if matmul_weights and (node.target in _MATMULS or _plain_addmm(node)):
        return _matmul_layer(gm, node)
    return None


def _matmul_layer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> WeightLayer | None:
    """``x @ W`` (W stored [in, out]) or ``x @ T(W)`` (W stored [out, in]) with W a 2-D parameter."""
    operand = node.args[2 if node.target == _ADDMM else 1]
    transposed = not _is_transpose(operand)
    weight = operand if transposed else operand.args[0]  # type: ignore[union-attr]
    if not _is_attr(weight):
        return None
    tensor = _tensor(gm, str(weight.target))  # type: ignore[union-attr]
    x = node.args[1 if node.target == _ADDMM else 0]
    x_value = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if tensor.dim() != 2 or not isinstance(x_value, torch.Tensor) or x_value.dim() < 1:
        return None
    return WeightLayer(node, str(weight.target), "linear", tuple(tensor.shape), transposed=transposed)  # type: ignore[union-attr]


def _plain_addmm(node: torch.fx.Node) -> bool:
    """``addmm`` computing ``bias + x @ W`` (beta = alpha = 1)."""
    return (
        node.target == _ADDMM
        and len(node.args) == 3
        and all(node.kwargs.get(k, 1) == 1 for k in ("beta", "alpha"))
    )


def _is_transpose(arg: object) -> bool:
    """A 2-D transpose of a parameter: ``t``, ``.T``, ``transpose(0, 1)``, ``permute([1, 0])``."""
    if not isinstance(arg, torch.fx.Node) or arg.op != "call_function" or arg.target not in _TRANSPOSES:
        return False
    if arg.target == aten.transpose.int:
        return sorted(d % 2 for d in arg.args[1:3] if isinstance(d, int)) == [0, 1]
    if arg.target == aten.permute.default:
        dims = arg.args[1]
        return isinstance(dims, (list, tuple)) and [d % 2 for d in dims if isinstance(d, int)] == [1, 0]
    return True


def _is_attr(arg: object) -> bool:
    return isinstance(arg, torch.fx.Node) and arg.op == "get_attr"


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
class WeightLayers(Analysis[tuple[WeightLayer, ...]]):
    """:func:`weight_layers` as a cached analysis, so the passes and planners of one run share it."""

    matmul_weights: bool = False

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> tuple[WeightLayer, ...]:
        return tuple(weight_layers(gm, matmul_weights=self.matmul_weights))


@dataclass(frozen=True)
class LayerPlan:
    """What a pruning pass will do to one weight: its sparsity (None = left dense) and why.

    ``indivisible``: left dense because the block does not tile it (not by the user's selection),
    which is what the pass warns about; ``reason`` is the sentence for people.
    """

    param: str
    sparsity: float | None
    reason: str
    indivisible: bool = False


@dataclass(frozen=True)
class LayerSelection:
    """Which weight layers a pruning pass touches, and at what sparsity.

    ``per_layer`` maps a parameter name (e.g. ``"layer1.0.conv1.weight"``) to its own sparsity and
    overrides the pass's; a mapping given here is stored as sorted pairs so the options stay hashable.
    ``skip_first`` / ``skip_last`` leave the first / last layer in graph order dense; ``min_size``
    leaves weights with fewer elements dense; ``kinds`` restricts to linears or convs; ``only``,
    when given, to the named parameters (a per-layer plan, such as the speed search's).
    """

    skip_first: bool = False
    skip_last: bool = False
    min_size: int = 0
    kinds: tuple[str, ...] = ("linear", "conv")
    per_layer: tuple[tuple[str, float], ...] | Mapping[str, float] = ()
    only: tuple[str, ...] = ()

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
        if self.only and layer.param not in self.only:
            return "not in the layers selected by name"
        if layer.kind not in self.kinds:
            return f"kind {layer.kind} not selected"
        if self.skip_first and index == 0:
            return "first layer (skip_first)"
        if self.skip_last and index == count - 1:
            return "last layer (skip_last)"
        if math.prod(layer.shape) < self.min_size:
            return f"{math.prod(layer.shape)} elements < min_size {self.min_size}"
        return ""
