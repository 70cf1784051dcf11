"""Units of the speed search: the pieces of a model whose choices add up independently.

A **structured unit** is a prunable channel group read by exactly one weight layer (its consumer)
and written by one or more (its producers): an FFN's hidden neurons (FFN1 writes them, FFN2 reads
them), a block of attention heads (q/k/v write, the output projection reads), the inner channels
of a ResNet bottleneck. Removing a fraction of its units shrinks all those layers at once, and
nothing outside them, so its time and loss are the unit's own. Every other weight layer (a
classifier, a layer whose channels are coupled to a residual stream) is a **layer unit** of its
own. A layer belongs to one unit at most, the first that claims it in graph order, so the times
of the units add up to the time of the layers (a conv that is the consumer of one group and the
producer of the next is counted in the first; its shrinking by the second is the first-order
approximation the measured correction in ``tilefx.speed_target`` absorbs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ..analysis.channel_groups import ChannelGroup, ChannelGroups
from ..analysis.weight_layers import WeightLayer

__all__ = ["Unit", "search_units"]


@dataclass(frozen=True)
class Unit:
    """Weight layers (parameter names) whose time the unit owns; ``group`` is the channel group id of
    a structured unit (``channels`` units; ``producers`` and ``consumer``: every layer the group
    shrinks, including producers an earlier unit owns), else None. ``rows[param][u]`` are channel
    unit u's positions along each producer's output dim; ``columns[u]``, its columns in the
    consumer's matrix view (a conv's input channel spans ``kh·kw`` of them)."""

    name: str
    layers: tuple[str, ...]
    group: int | None = None
    channels: int = 0
    producers: tuple[str, ...] = ()
    consumer: str | None = None
    rows: Mapping[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict, compare=False, hash=False)
    columns: tuple[tuple[int, ...], ...] = field(default=(), compare=False, hash=False)

    @property
    def structured(self) -> bool:
        return self.group is not None


def search_units(groups: ChannelGroups, layers: Sequence[WeightLayer]) -> list[Unit]:
    """The units of a graph: structured ones for every group with one consumer layer, then the
    layers no group claimed, in graph order."""
    by_param = {layer.param: layer for layer in layers}
    claimed: set[str] = set()
    units: list[Unit] = []
    for group in groups.prunable():
        unit = _structured(group, by_param)
        if unit is None or unit.consumer in claimed or group.units < 2:
            continue
        owned = tuple(p for p in unit.layers if p not in claimed)  # time counted once
        claimed |= set(owned)
        units.append(replace(unit, layers=owned))
    order = {layer.param: i for i, layer in enumerate(layers)}
    rest = [Unit(layer.param, (layer.param,)) for layer in layers if layer.param not in claimed]
    return sorted([*units, *rest], key=lambda u: min(order[p] for p in u.layers))


def _structured(group: ChannelGroup, layers: dict[str, WeightLayer]) -> Unit | None:
    """A group read by one weight layer's input dim and written by weight layers' output dims."""
    consumers = {
        s.target
        for s in group.slices_by_role("in")
        if s.target in layers and _is_input_dim(s.dim, layers[s.target])
    }
    producers = {
        s.target
        for s in group.slices_by_role("out")
        if s.target in layers and _is_output_dim(s.dim, layers[s.target])
    }
    if len(consumers) != 1 or not producers or consumers & producers:
        return None
    consumer = next(iter(consumers))
    ordered = tuple(sorted(producers))
    rows = {s.target: _positions(s.positions) for s in group.slices_by_role("out") if s.target in producers}
    read = next(s for s in group.slices_by_role("in") if s.target == consumer)
    area = math.prod(layers[consumer].shape[2:])  # a conv kernel's kh·kw columns per input channel
    columns = tuple(
        tuple(c * area + k for c in unit for k in range(area)) for unit in _positions(read.positions)
    )
    return Unit(
        f"channels:{consumer}", (*ordered, consumer), group.id, group.units, ordered, consumer, rows, columns
    )


def _positions(array: np.ndarray) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(p) for p in row) for row in array)


def _is_input_dim(dim: int, layer: WeightLayer) -> bool:
    return dim == (0 if layer.transposed else 1) and layer.groups == 1


def _is_output_dim(dim: int, layer: WeightLayer) -> bool:
    return dim == (1 if layer.transposed else 0)
