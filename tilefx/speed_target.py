"""``Recipe(speedup=s)``: the model that is ``s`` times faster than dense torch, compiled, at the least loss.

The steps, each measured on this machine and these calibration batches:

1. **Units and options** (``passes.search.units``): every weight layer belongs to one unit — a
   channel group with its producers and one consumer (an FFN's neurons, a block of attention
   heads, a bottleneck's inner channels), or a layer alone. A unit may keep a fraction of its
   channels (structured units), run in a narrower number format, and prune blocks.
2. **Times** (``tilefx.latency``): each layer's dense torch time and each option's compiled time,
   measured once per shape and cached; the rest of the model (attention core, norms, GELU, ...)
   is the dense model's measured time minus its layers'.
3. **Losses** (``passes.search.losses``): each option applied to its unit alone, the damage
   measured at the model's output on held-out calibration batches.
4. **Choice** (``passes.search.knapsack``): the least summed loss whose summed time fits
   ``dense time / s`` — a multiple-choice knapsack, solved exactly by dynamic programming.
5. **Make and measure**: the choice becomes verified passes (``passes.search.apply``), the result
   is compiled and timed interleaved with dense torch. If the measured speed-up falls short of the
   target, overshoots it by more than ``OVERSHOOT``, or meets it where the model predicted a
   shortfall (a pessimistic model: the target looked out of reach and the fastest choice was
   taken), the budget is corrected by the model's measured error (measured / predicted speed-up)
   and steps 4–5 repeat (``SpeedSearch.rounds``): the latency model is additive and first-order,
   and its table is timed on a shared machine; the measurement is the whole model. Of the rounds
   that reached the target (``REACHED`` of it), the least damage is returned.

``Recipe(quality=q)`` is the dual: the fastest choice whose estimated output similarity
``1 − Σ‖y − y_dense‖² / Σ‖y_dense‖²`` stays at least ``q``, read off the same DP table.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.passes.shape_prop import ShapeProp

from tilefx.errors import RecipeError
from tilefx.passes.analysis.channel_groups import ChannelGroupsAnalysis
from tilefx.passes.analysis.weight_layers import WeightLayer, weight_layers
from tilefx.passes.cleanup import EliminateDeadCodePass
from tilefx.passes.fold_batchnorm import FoldBatchNormPass
from tilefx.passes.infra.analysis_manager import AnalysisManager
from tilefx.passes.infra.manager import PassManager, PipelineResult
from tilefx.passes.infra.pass_base import PassBase
from tilefx.passes.quantize_linears import QuantizeLinearsPass
from tilefx.passes.recover_sparsity import token_mask_position
from tilefx.passes.search.apply import passes_for
from tilefx.passes.search.knapsack import Choice, LayerChoices, frontier
from tilefx.passes.search.losses import Option, OptionLosses, measure_losses
from tilefx.passes.search.space import SpeedSearch
from tilefx.passes.search.units import Unit, search_units
from tilefx.passes.training.calibration import Calibration
from tilefx.timing import interleaved_timings

from .latency import LatencyTable, LayerShape

__all__ = ["SearchReport", "search_pipeline"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchReport:
    """What the search chose and what it measured, round by round."""

    chosen: dict[str, str]  # unit → option name
    target: float | None
    predicted: float  # predicted speed-up of the final choice
    measured: tuple[float, ...]  # measured compiled speed-up of each round
    estimated_quality: float  # 1 − summed relative output damage


@dataclass
class _Search:
    units: list[Unit]
    layers: dict[str, WeightLayer]
    losses: dict[str, OptionLosses]
    choices: list[LayerChoices]
    options: dict[str, dict[str, Option]]  # unit → option name → option
    dense_ms: float
    rest_ms: float


def search_pipeline(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    calibration: Calibration,
    *,
    speedup: float | None,
    quality: float | None,
    search: SpeedSearch,
    tail: Sequence[PassBase] = (),
    verify: bool = True,
    tolerance: float = 1e-5,
    latency: LatencyTable | None = None,
    measure: Callable[[torch.fx.GraphModule], float] | None = None,
) -> tuple[PipelineResult, SearchReport]:
    """Run the search on ``gm`` (captured, unmodified): the last round's verified pipeline result
    and the report. ``tail``: passes to run after the search's structure and sparsity, before its
    number formats (recovery training, for instance).
    ``latency``: the time table (default: measured on this machine, cached); ``measure``: the
    speed-up of an optimized graph (default: compiled and timed against ``gm``)."""
    prefix: list[PassBase] = [FoldBatchNormPass(), EliminateDeadCodePass()]
    folded = PassManager(prefix, verify=False).run(gm, example_inputs).graph_module
    batches = [inputs for inputs, _ in calibration]
    if len(batches) < search.calibration_batches + search.check_batches:
        raise RecipeError(
            f"Recipe(speedup=...) needs {search.calibration_batches + search.check_batches} calibration batches "
            f"(SpeedSearch.calibration_batches + check_batches), got {len(batches)}"
        )
    state = _prepare(folded, example_inputs, batches, search, latency or LatencyTable())
    measure = measure or (lambda optimized: _measured_speedup(gm, optimized, example_inputs))
    target_ms = state.dense_ms / speedup if speedup is not None else None
    budget = target_ms
    correction = 1.0  # measured / modelled speed-up, learnt from the rounds
    measured: list[float] = []
    made_so_far: list[_Made] = []
    for round_ in range(search.rounds):
        chosen = _choose(state, budget, quality)
        if made_so_far and chosen == made_so_far[-1].chosen:
            break  # the corrected budget changes nothing
        orders = {unit: losses.order for unit, losses in state.losses.items()}
        data = Calibration([(x, None) for x in batches[: search.calibration_batches]])
        made = passes_for(
            state.units, chosen, orders, data, search.calibration_batches, search.attention, search.progress
        )
        # Training runs on the fp32 model the choice made; number formats come after it (a
        # quantized layer's grid is fixed when it is chosen, and training would leave it).
        quantize = [p for p in made if isinstance(p, QuantizeLinearsPass)]
        passes = [*prefix, *(p for p in made if p not in quantize), *tail, *quantize]
        result = PassManager(passes, verify=verify, tolerance=tolerance).run(gm, example_inputs)
        achieved = measure(result.graph_module)
        measured.append(achieved)
        made_so_far.append(_Made(chosen, result, achieved, _damage(state, chosen)))
        predicted = state.dense_ms / _predicted_ms(state, chosen) * correction
        log.info(
            "speed search round %d: measured %.2fx, predicted %.2fx (target %s)",
            round_ + 1,
            achieved,
            predicted,
            speedup,
        )
        if speedup is None or target_ms is None:
            break
        # A choice the model said falls short but that measured on target means the model is
        # pessimistic: a less damaging choice may reach the target too, so go on.
        pessimistic = predicted < REACHED * speedup <= achieved
        if REACHED * speedup <= achieved <= OVERSHOOT * speedup and not pessimistic:
            break
        if achieved < REACHED * speedup and any(m.achieved >= REACHED * speedup for m in made_so_far[:-1]):
            break  # past the target from above: an earlier round met it
        # The latency model was off by achieved / predicted: correct the budget by that much.
        correction *= achieved / predicted
        budget = target_ms * correction
    final = _pick(made_so_far, speedup)
    predicted = state.dense_ms / _predicted_ms(state, final.chosen)
    report = SearchReport(
        {u: o.name for u, o in final.chosen.items()}, speedup, predicted, tuple(measured), 1 - final.damage
    )
    return final.result, report


#: A measured speed-up this close to the target counts as reaching it: what ``Recipe(speedup=s)``
#: promises is a measured ``0.9·s``. Whole-model timings on a shared 2-core machine spread by 5–10%
#: between rounds; at 0.95 the demo's second round (0.94·s, less damage) was dropped for its first
#: (1.12·s in the search, 1.21·s in the final table, cosine 0.80–0.83).
REACHED = 0.9
#: A measured speed-up this far above the target gives quality away: the search loosens its budget.
OVERSHOOT = 1.1


@dataclass(frozen=True)
class _Made:
    chosen: dict[str, Option]
    result: PipelineResult
    achieved: float
    damage: float


def _damage(state: _Search, chosen: dict[str, Option]) -> float:
    return sum(state.losses[u.name].of(chosen[u.name]) for u in state.units)


def _pick(made: list[_Made], speedup: float | None) -> _Made:
    """The round to return: of those that met the target, the least damage; else the fastest."""
    if speedup is None:
        return made[-1]
    met = [m for m in made if m.achieved >= REACHED * speedup]
    return min(met, key=lambda m: m.damage) if met else max(made, key=lambda m: m.achieved)


def _prepare(
    gm: torch.fx.GraphModule,
    inputs: Sequence[Any],
    batches: list[tuple[Any, ...]],
    search: SpeedSearch,
    table: LatencyTable,
) -> _Search:
    """Units, their options' times and losses, and the dense time split into layers and the rest."""
    am = AnalysisManager(gm, inputs)
    layers = {layer.param: layer for layer in weight_layers(gm)}
    units = search_units(am.get(ChannelGroupsAnalysis(attention=search.attention)), list(layers.values()))
    offered = search.options()
    calibration, check = (
        batches[: search.calibration_batches],
        batches[search.calibration_batches :][: search.check_batches],
    )
    losses = measure_losses(
        gm, units, layers, offered, calibration, check, token_mask_position(gm, inputs), search.progress
    )
    shapes = _shapes(gm, inputs, layers)
    dense_layers = sum(table.ms(shape, Option()) for shape in shapes.values())
    dense_ms = table.model_ms(gm, inputs)
    rest = max(dense_ms - dense_layers, 0.05 * dense_ms)
    choices, by_name = [], {}
    for unit in units:
        convs = any(shapes[p].conv is not None for p in unit.layers)
        allowed = [
            o
            for o in offered
            if (unit.structured or o.keep == 1.0)
            and not (convs and (o.format != "fp32" or o.block is not None))  # convs: channels only
            and math.isfinite(losses[unit.name].of(o))
        ]
        ms = {
            o.name: sum(table.ms(shapes[p], _layer_option(o)) for p in unit.layers) * o.keep for o in allowed
        }
        choices.append(
            LayerChoices(
                unit.name, tuple(Choice(o.name, ms[o.name], losses[unit.name].of(o)) for o in allowed)
            )
        )
        by_name[unit.name] = {o.name: o for o in allowed}
    log.info("speed search: dense %.2f ms, layers %.2f ms, rest %.2f ms", dense_ms, dense_layers, rest)
    return _Search(units, layers, losses, choices, by_name, dense_ms, rest)


def _choose(state: _Search, budget: float | None, quality: float | None) -> dict[str, Option]:
    horizon = sum(max(c.ms for c in layer.choices) for layer in state.choices)
    table = frontier(state.choices, horizon, buckets=4000)
    if budget is not None:
        fastest = sum(min(c.ms for c in layer.choices) for layer in state.choices)
        layers_budget = budget - state.rest_ms
        if layers_budget < fastest:
            log.warning(
                "speed search: %.2fx is beyond what the options reach here (the fastest choice predicts "
                "%.2fx); taking the fastest",
                state.dense_ms / budget,
                state.dense_ms / (state.rest_ms + fastest),
            )
            return _fastest(state)
        try:
            picked = table.assignment(layers_budget)
        except RecipeError:  # within the grid's rounding of the fastest choice's time
            return _fastest(state)
    elif quality is not None:
        picked = table.fastest_within(1 - quality)
    else:
        raise RecipeError("the speed search needs Recipe(speedup=...) or Recipe(quality=...)")
    return {unit: state.options[unit][choice.name] for unit, choice in picked.items()}


def _fastest(state: _Search) -> dict[str, Option]:
    picked = {c.layer: min(c.choices, key=lambda choice: (choice.ms, choice.loss)) for c in state.choices}
    return {unit: state.options[unit][choice.name] for unit, choice in picked.items()}


def _predicted_ms(state: _Search, chosen: dict[str, Option]) -> float:
    times = {c.layer: {choice.name: choice.ms for choice in c.choices} for c in state.choices}
    return state.rest_ms + sum(times[u][o.name] for u, o in chosen.items())


def _layer_option(option: Option) -> Option:
    """The per-layer kernel an option runs (its kept fraction scales the time instead)."""
    return Option(format=option.format, block=option.block, sparsity=option.sparsity)


def _shapes(
    gm: torch.fx.GraphModule, inputs: Sequence[Any], layers: dict[str, WeightLayer]
) -> dict[str, LayerShape]:
    """Each layer's shape on the example inputs: a linear's GEMM (rows = every leading dim), a conv's
    input and geometry."""
    ShapeProp(gm).propagate(*pytree.tree_leaves(tuple(inputs)))
    shapes = {}
    for param, layer in layers.items():
        meta = layer.input.meta.get("tensor_meta")
        if meta is None:
            raise RecipeError(f"Recipe(speedup=...): the input shape of {param} is unknown")
        shape = tuple(meta.shape)
        if layer.kind == "linear":
            shapes[param] = LayerShape(math.prod(shape[:-1]), layer.in_channels, layer.out_channels)
            continue
        stride, padding, dilation = (_first_of(v) for v in layer.conv_geometry)
        geometry = (
            shape[2],
            shape[3],
            layer.shape[2],
            layer.shape[3],
            stride,
            padding,
            dilation,
            layer.groups,
        )
        shapes[param] = LayerShape(shape[0], shape[1], layer.out_channels, geometry)
    return shapes


def _first_of(value: object) -> int:
    """A conv argument as one int (tilefx's layers use square strides, paddings and dilations)."""
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)  # type: ignore[call-overload]


def _measured_speedup(
    dense: torch.nn.Module, optimized: torch.fx.GraphModule, inputs: Sequence[Any]
) -> float:
    """Dense torch over the compiled model, interleaved medians."""
    from tilefx.lowering.build import compile_graph  # tvm is imported only when compiling

    compiled = compile_graph(optimized, "llvm")
    flat = pytree.tree_leaves(tuple(inputs))
    times = interleaved_timings(
        {"dense": lambda: dense(*flat), "compiled": lambda: compiled(*flat)}, rounds=15, warmup=3
    )
    return times["dense"].median / times["compiled"].median
