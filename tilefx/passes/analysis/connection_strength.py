"""Synaptic Strength (Lin et al., NeurIPS 2018), post-training estimate: one score per connection.

A connection is (output channel o, input channel i) of a conv (the kernel ``W[o, i, :, :]``) or one
entry ``W[o, i]`` of a linear. The paper's method section could not be read (``docs/methods.md``); a NeurIPS
review describes the strength as "the product of the norms of the kernel ... and the norm of the
input" [2nd]. The estimate here, without data, is::

    strength(o, i) = |γ_i| · ‖W[o, i]‖

where ``γ_i`` is the scale of the batch-norm that produces the conv's input channel i (the input's
magnitude after BN is proportional to |γ_i|), found by walking back from the conv's input through
channel-preserving ops (ReLU-like activations, dropout, clone, pooling; ``flatten`` before a linear
repeats γ over H·W). No batch-norm found → γ = 1, i.e. the plain kernel norm.

[unverified], each an option of :class:`StrengthOptions`:
  - which BN: the *input's* BN (BN → ReLU → conv) is the reading used here; the paper may mean
    the BN after the conv (``input_scale="none"`` drops γ altogether);
  - the kernel norm: Frobenius (``"fro"``, default) or L1;
  - BN's shift β is ignored (an input channel with γ≈0 but large β still carries a constant);
  - ``layernorm=True`` (extension, not from the paper) also takes γ from a LayerNorm's weight.
The training-time form (learned per-connection strength) lives in ``passes/training/learned_strength.py``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx

from tilefx.options import options

from ..graph_utils import BATCH_NORMS
from ..infra.analysis_manager import Analysis, AnalysisManager
from .weight_layers import WeightLayer, weight_layers

__all__ = ["StrengthOptions", "SynapticStrength", "connection_strength", "input_scale"]

aten = torch.ops.aten

_PASS_THROUGH = frozenset(
    {
        aten.relu.default,
        aten.relu_.default,
        aten.relu6.default,
        aten.gelu.default,
        aten.silu.default,
        aten.silu_.default,
        aten.hardtanh.default,
        aten.hardtanh_.default,
        aten.hardswish.default,
        aten.leaky_relu.default,
        aten.dropout.default,
        aten.clone.default,
        aten.contiguous.default,
        aten.max_pool2d.default,
        aten.avg_pool2d.default,
        aten.adaptive_avg_pool2d.default,
    }
)
_FLATTEN = frozenset({aten.flatten.using_ints})


@options
class StrengthOptions:
    """The [unverified] choices of the post-training estimate; see the module docstring."""

    input_scale: Literal["bn", "none"] = "bn"
    kernel_norm: Literal["fro", "l1"] = "fro"
    layernorm: bool = False


@dataclass(frozen=True)
class SynapticStrength(Analysis[dict[str, torch.Tensor]]):
    """``{weight name: strength [out, in/groups]}`` for every linear/conv weight of the graph."""

    options: StrengthOptions = field(default_factory=StrengthOptions)

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> dict[str, torch.Tensor]:
        return {layer.param: connection_strength(gm, layer, self.options) for layer in weight_layers(gm)}


def connection_strength(
    gm: torch.fx.GraphModule, layer: WeightLayer, options: StrengthOptions
) -> torch.Tensor:
    """Strength of every connection of ``layer``: float64 ``[out, in/groups]``."""
    weight = gm.get_parameter(layer.param).detach().to("cpu", torch.float64)
    kernel = weight.reshape(weight.shape[0], weight.shape[1], -1)
    norms = kernel.norm(dim=2) if options.kernel_norm == "fro" else kernel.abs().sum(dim=2)
    if options.input_scale == "none":
        return norms
    gamma = input_scale(gm, layer, layernorm=options.layernorm)
    return norms * _per_connection(gamma.abs(), layer)


def input_scale(gm: torch.fx.GraphModule, layer: WeightLayer, layernorm: bool = False) -> torch.Tensor:
    """γ of every (global) input channel of ``layer``; ones where no normalisation produces it."""
    channels = layer.shape[1] * layer.groups
    node, repeat = layer.input, 1
    while node.op == "call_function" and node.target in _PASS_THROUGH | _FLATTEN:
        if node.target in _FLATTEN:
            repeat = _flatten_repeat(node, channels)
            if repeat == 0:
                break
        node = node.args[0]  # type: ignore[assignment]
        if not isinstance(node, torch.fx.Node):
            break
    gamma = _scale_of(gm, node, layernorm)
    if gamma is None or gamma.numel() * repeat != channels:
        return torch.ones(channels, dtype=torch.float64)
    return gamma.to(torch.float64).repeat_interleave(repeat)


def _scale_of(gm: torch.fx.GraphModule, node: torch.fx.Node, layernorm: bool) -> torch.Tensor | None:
    if node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]  # type: ignore[assignment]
    norms = BATCH_NORMS | ({aten.layer_norm.default} if layernorm else frozenset())
    if node.op != "call_function" or node.target not in norms:
        return None
    index = 2 if node.target == aten.layer_norm.default else 1
    weight = node.args[index] if len(node.args) > index else None
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
        return None  # affine=False: the scale is 1
    return gm.get_parameter(str(weight.target)).detach().to("cpu")


def _flatten_repeat(node: torch.fx.Node, channels: int) -> int:
    """How many consecutive features of flatten(start_dim=1) share one channel; 0 if unknown."""
    start = node.args[1] if len(node.args) > 1 else 0
    source = node.args[0]
    value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    if start != 1 or value is None or value.dim() < 2:
        return 0
    per_channel = channels // int(value.shape[1]) if value.shape[1] else 0
    return per_channel if per_channel * int(value.shape[1]) == channels else 0


def _per_connection(gamma: torch.Tensor, layer: WeightLayer) -> torch.Tensor:
    """Map global input-channel scales onto the ``[out, in/groups]`` connection grid."""
    out, local = layer.shape[0], layer.shape[1]
    group = torch.arange(out) // (out // layer.groups)
    index = group[:, None] * local + torch.arange(local)[None, :]
    return gamma[index]
