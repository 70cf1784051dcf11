"""Fold eval-mode batch norms into the convolution or linear layer that feeds them (exact)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx

from tilefx.errors import PreconditionError

from .graph_utils import (
    BATCH_NORM,
    attr_tensor,
    get_attr_users,
    param_node,
    set_attr_tensor,
    unique_attr_name,
)
from .infra.analysis_manager import AnalysisManager
from .infra.pass_base import Numerics, PassBase, PassResult
from .infra.preconditions import require_aten_graph

__all__ = ["FoldBatchNormPass"]

aten = torch.ops.aten
_FOLDABLE = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default}


@dataclass(frozen=True)
class FoldBatchNormPass(PassBase):
    """``bn(conv(x, W, b))`` → ``conv(x, W·s, (b − μ)·s + β)`` with ``s = γ / √(σ² + ε)``.

    Handles conv1d/2d/3d and linear producers, with or without bias. A BN is left alone when its
    producer has other users, or when the producer's weight is shared with another layer (folding
    would change that layer too).
    Requires: an eval-mode ATen graph (``aten.batch_norm`` with ``training=False``); a training-mode
    BN normalises with batch statistics, which no weight can hold: :class:`PreconditionError`.
    """

    numerics: ClassVar[Numerics] = "exact"

    def requires(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> None:
        require_aten_graph(self.name, gm)
        for node in gm.graph.nodes:
            if node.target == aten.batch_norm.default and node.args[5]:
                raise PreconditionError(
                    self.name,
                    node.name,
                    "is a batch norm in training mode (it normalises with batch statistics)",
                    "export the model after model.eval() (or hand optimize the nn.Module, it "
                    "captures in eval mode), or keep the batch norms with Recipe(fold_batchnorm=False)",
                )

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        folded = 0
        for bn in list(gm.graph.nodes):
            producer = _foldable_producer(gm, bn)
            if producer is not None:
                _fold(gm, producer, bn)
                folded += 1
        if folded:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, modified=folded > 0)


def _foldable_producer(gm: torch.fx.GraphModule, bn: torch.fx.Node) -> torch.fx.Node | None:
    if bn.op != "call_function" or bn.target != BATCH_NORM:
        return None
    producer, weight, bias, mean, var, training = bn.args[:6]
    if training or not isinstance(producer, torch.fx.Node) or producer.target not in _FOLDABLE:
        return None
    if len(producer.users) != 1 or param_node(mean) is None or param_node(var) is None:
        return None
    if any(a is not None and param_node(a) is None for a in (weight, bias)):
        return None
    conv_weight = param_node(producer.args[1])
    bias_arg = _bias_arg(producer)
    if conv_weight is None or len(get_attr_users(gm, conv_weight)) != 1:
        return None
    conv_bias = param_node(bias_arg)
    if bias_arg is not None and (conv_bias is None or len(get_attr_users(gm, conv_bias)) != 1):
        return None
    return producer


def _bias_arg(producer: torch.fx.Node) -> object:
    return producer.args[2] if len(producer.args) > 2 else None


def _fold(gm: torch.fx.GraphModule, producer: torch.fx.Node, bn: torch.fx.Node) -> None:
    _, gamma_arg, beta_arg, mean_arg, var_arg, _, _, eps = bn.args[:8]
    mean, var = _tensor(gm, mean_arg), _tensor(gm, var_arg)
    gamma = _tensor(gm, gamma_arg) if gamma_arg is not None else torch.ones_like(mean)
    beta = _tensor(gm, beta_arg) if beta_arg is not None else torch.zeros_like(mean)
    weight_target = _target(producer.args[1])
    weight = attr_tensor(gm, weight_target)
    bias_target = param_node(_bias_arg(producer))
    bias = attr_tensor(gm, bias_target) if bias_target is not None else torch.zeros_like(mean)

    with torch.no_grad():
        scale = gamma.double() / torch.sqrt(var.double() + float(eps))  # type: ignore[arg-type]
        new_weight = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        new_bias = (bias.double() - mean.double()) * scale + beta.double()
    set_attr_tensor(gm, weight_target, new_weight.to(weight.dtype))
    if bias_target is not None:
        set_attr_tensor(gm, bias_target, new_bias.to(bias.dtype))
    else:
        _add_bias(gm, producer, weight_target, new_bias.to(weight.dtype))
    bn.replace_all_uses_with(producer)
    gm.graph.erase_node(bn)


def _add_bias(
    gm: torch.fx.GraphModule, producer: torch.fx.Node, weight_target: str, bias: torch.Tensor
) -> None:
    owner = weight_target.rpartition(".")[0]
    target = unique_attr_name(gm, f"{owner}.bias" if owner else "bias")
    set_attr_tensor(gm, target, bias)
    with gm.graph.inserting_before(producer):
        bias_node = gm.graph.get_attr(target)
    args = list(producer.args)
    args += [None] * (3 - len(args))
    args[2] = bias_node
    producer.args = tuple(args)


def _target(arg: object) -> str:
    target = param_node(arg)
    if target is None:
        raise TypeError(f"expected a get_attr node, got {arg!r}")
    return target


def _tensor(gm: torch.fx.GraphModule, arg: object) -> torch.Tensor:
    return attr_tensor(gm, _target(arg))
