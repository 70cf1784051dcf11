"""What each option of each unit costs the model's output, measured on calibration batches.

The search needs a loss per (unit, option) that adds up over units. Layer-local errors do not:
the same relative error hurts the output more in some layers than in others (on all-MiniLM-L6-v2
the last two layers were twice as sensitive as the first four; a layer-local allocation did worse
than a uniform one), which is SPDY's point. So each option is applied to **one unit alone** and
the damage is measured **at the model's output**: the relative squared error
``Σ‖y − y_dense‖² / Σ‖y_dense‖²`` on held-out calibration batches — the first-order additive model
of SPDY (Frantar & Alistarh 2022) and ZipLM (Kurtic et al. 2023).

Options are separable and their losses add: the channel fraction a structured unit keeps (units
chosen by greedy Optimal Brain Surgeon over the consumer's input Hessian — ZipLM's criterion — and
the consumer refit by least squares to the dense output), a number format (the fake quantization
``QuantizeLinearsPass`` applies), and block sparsity (OBS block selection and least-squares refit,
as ``training.reconstruct``). Each is applied to a copy of the graph, its damage measured, and the
copy dropped; Hessians are computed once per layer on the dense model.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from tqdm import tqdm

from ..analysis.weight_layers import WeightLayer
from ..metadata import matrix_view
from ..quantize_linears import Quantization, QuantizeLinearsPass
from ..training.gradual_pruning import MaskedWeight
from ..training.loop import show_progress
from ..training.reconstruct import dense_weight, input_gram, refit
from .units import Unit

__all__ = [
    "Option",
    "OptionLosses",
    "greedy_obs_order",
    "measure_losses",
    "output_damage",
    "removed_count",
    "without_channels",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Option:
    """One way to run a unit: the fraction of its channels kept (structured units), its number
    format, and a block sparsity (``block`` None: dense)."""

    keep: float = 1.0
    format: str = "fp32"
    block: tuple[int, int] | None = None
    sparsity: float = 0.0

    @property
    def name(self) -> str:
        parts = [] if self.keep == 1.0 else [f"keep {self.keep:.3g}"]
        parts.append(self.format)
        if self.block is not None:
            parts.append(f"{self.block[0]}x{self.block[1]}@{self.sparsity:.2g}")
        return " ".join(parts)


@dataclass(frozen=True)
class OptionLosses:
    """The separable losses of one unit: per kept fraction, per format, per (block, sparsity);
    ``order``: the unit's channel units, least important first (structured units only)."""

    keep: dict[float, float]
    format: dict[str, float]
    sparse: dict[tuple[tuple[int, int], float], float]
    order: tuple[int, ...] = ()

    def of(self, option: Option) -> float:
        loss = self.keep[option.keep] + self.format[option.format]
        if option.block is not None:
            loss += self.sparse[(option.block, option.sparsity)]
        return loss


def output_damage(
    gm: torch.nn.Module, batches: Sequence[tuple[Any, ...]], dense: Sequence[torch.Tensor]
) -> float:
    """``Σ‖y − y_dense‖² / Σ‖y_dense‖²`` over the batches (``dense``: the dense model's outputs)."""
    error = total = 0.0
    with torch.no_grad():
        for inputs, reference in zip(batches, dense, strict=True):
            out = _first(gm(*pytree.tree_leaves(tuple(inputs))))
            error += float((out.double() - reference.double()).pow(2).sum())
            total += float(reference.double().pow(2).sum())
    return error / max(total, 1e-30)


def measure_losses(
    gm: torch.fx.GraphModule,
    units: Sequence[Unit],
    layers: dict[str, WeightLayer],
    options: Sequence[Option],
    calibration: Sequence[tuple[Any, ...]],
    check: Sequence[tuple[Any, ...]],
    token_mask: int | None,
    progress: bool = True,
) -> dict[str, OptionLosses]:
    """Every unit's separable losses for ``options``, each measured at the output on ``check``;
    ``calibration`` (inputs only) estimates the Hessians."""
    with torch.no_grad():
        dense_out = [_first(gm(*pytree.tree_leaves(tuple(x)))).detach() for x in check]
    keeps = sorted({o.keep for o in options})
    formats = sorted({o.format for o in options})
    sparse = sorted({(o.block, o.sparsity) for o in options if o.block is not None})
    grams: dict[str, torch.Tensor] = {}

    def gram(param: str) -> torch.Tensor:
        if param not in grams:
            grams[param] = input_gram(gm, layers[param], calibration, token_mask)
        return grams[param]

    out: dict[str, OptionLosses] = {}
    for unit in tqdm(units, desc="search: losses", disable=not show_progress(progress), dynamic_ncols=True):
        order: tuple[int, ...] = ()
        keep_losses = {1.0: 0.0}
        if unit.structured and unit.consumer is not None and min(keeps) < 1.0:
            h = gram(unit.consumer)
            order = greedy_obs_order(gm, unit, layers[unit.consumer], h, min(keeps))
            for keep in (k for k in keeps if k < 1.0):
                trial = without_channels(gm, unit, layers, order[: removed_count(unit, keep)], h)
                keep_losses[keep] = output_damage(trial, check, dense_out)
        linear = all(layers[p].kind == "linear" for p in unit.layers)  # formats and blocks: linears
        format_losses = {
            fmt: 0.0
            if fmt == "fp32"
            else _format_loss(gm, unit, fmt, check, dense_out)
            if linear
            else math.inf
            for fmt in formats
        }
        sparse_losses = {
            (block, s): _sparse_loss(gm, unit, layers, block, s, gram, check, dense_out)
            if linear
            else math.inf
            for block, s in sparse
            if block is not None
        }
        out[unit.name] = OptionLosses(keep_losses, format_losses, sparse_losses, order)
    return out


def greedy_obs_order(
    gm: torch.fx.GraphModule,
    unit: Unit,
    consumer: WeightLayer,
    h: torch.Tensor,
    min_keep: float,
    damp: float = 0.01,
) -> tuple[int, ...]:
    """Channel units of ``unit`` in the order greedy OBS removes them (ZipLM's criterion): each step
    drops the unit whose consumer columns G cost least, ``tr(W_G (H⁻¹_GG)⁻¹ W_Gᵀ)``, then updates W
    and H⁻¹ as OBS does; units never removed down to ``min_keep`` follow in index order (every
    option keeps them)."""
    weight = matrix_view(gm.get_parameter(consumer.param).detach()).double()
    if consumer.bias is not None:
        weight = torch.cat([weight, weight.new_zeros(weight.shape[0], 1)], 1)  # the bias: never removed
    full = h + damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(full))
    groups = [torch.as_tensor(columns) for columns in unit.columns]
    alive = list(range(unit.channels))
    removed: list[int] = []
    for _ in range(removed_count(unit, min_keep)):
        costs = torch.stack([_obs_cost(weight, hinv, groups[u]) for u in alive])
        pick = alive[int(costs.argmin())]
        g = groups[pick]
        inv_gg = torch.linalg.inv(hinv[g][:, g])
        weight -= weight[:, g] @ inv_gg @ hinv[g, :]
        hinv -= hinv[:, g] @ inv_gg @ hinv[g, :]
        hinv[g, :] = 0
        hinv[:, g] = 0
        hinv[g, g] = 1
        alive.remove(pick)
        removed.append(pick)
    return (*removed, *alive)


def _obs_cost(weight: torch.Tensor, hinv: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if g.numel() == 1:
        return weight[:, g[0]].pow(2).sum() / hinv[g[0], g[0]]
    return torch.einsum("og,gh,oh->", weight[:, g], torch.linalg.inv(hinv[g][:, g]), weight[:, g])


def removed_count(unit: Unit, keep: float) -> int:
    """Channel units a kept fraction removes (at least one is always kept)."""
    return unit.channels - max(1, round(unit.channels * keep))


def without_channels(
    gm: torch.fx.GraphModule, unit: Unit, layers: dict[str, WeightLayer], drop: Sequence[int], h: torch.Tensor
) -> torch.fx.GraphModule:
    """A copy of ``gm`` with ``unit``'s channel units ``drop`` zeroed at their producers and its
    consumer refit by least squares on the rest: the function their physical removal computes."""
    trial = copy.deepcopy(gm)
    with torch.no_grad():
        for producer in unit.producers:
            rows = torch.as_tensor([r for u in drop for r in unit.rows[producer][u]], dtype=torch.long)
            layer = layers[producer]
            trial.get_parameter(producer).index_fill_(1 if layer.transposed else 0, rows, 0.0)
            if layer.bias is not None and layer.bias.op == "get_attr":
                trial.get_parameter(str(layer.bias.target)).index_fill_(0, rows, 0.0)
    consumer = layers[unit.consumer or ""]
    weight = trial.get_parameter(consumer.param)
    out, columns = matrix_view(weight).shape
    keep = torch.ones(out, columns, dtype=torch.bool)
    keep[:, [c for u in drop for c in unit.columns[u]]] = False
    masked = MaskedWeight(consumer.param, weight, (1, 1), 0.0)
    refit(trial, dense_weight(trial, gm, consumer.param), masked, consumer, h, h, 0.01, keep=keep)
    return trial


def _format_loss(
    gm: torch.fx.GraphModule,
    unit: Unit,
    fmt: str,
    check: Sequence[tuple[Any, ...]],
    dense: Sequence[torch.Tensor],
) -> float:
    """The output damage of running only ``unit``'s linears in ``fmt`` (fake quantization)."""
    trial = copy.deepcopy(gm)
    others = tuple(p for p, _ in trial.named_parameters() if p.endswith(".weight") and p not in unit.layers)
    QuantizeLinearsPass(Quantization(format=fmt, keep=others))(trial, example_inputs=tuple(check[0]))  # type: ignore[arg-type]
    return output_damage(trial, check, dense)


def _sparse_loss(
    gm: torch.fx.GraphModule,
    unit: Unit,
    layers: dict[str, WeightLayer],
    block: tuple[int, int],
    sparsity: float,
    gram: Callable[[str], torch.Tensor],
    check: Sequence[tuple[Any, ...]],
    dense: Sequence[torch.Tensor],
) -> float:
    """The output damage of ``unit``'s layers alone pruned to ``block`` at ``sparsity`` with OBS
    selection and least-squares refit (on the dense input: only this unit changes)."""
    trial = copy.deepcopy(gm)
    for param in unit.layers:
        layer = layers[param]
        weight = trial.get_parameter(param)
        rows, cols = matrix_view(weight).shape
        if rows % block[0] or cols % block[1]:
            return float("inf")  # the block does not tile this layer: no such option
        h = gram(param)
        refit(
            trial,
            dense_weight(trial, gm, param),
            MaskedWeight(param, weight, block, sparsity),
            layer,
            h,
            h,
            0.01,
        )
    return output_damage(trial, check, dense)


def _first(output: Any) -> torch.Tensor:
    return next(
        leaf
        for leaf in pytree.tree_leaves(output)
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
    )
