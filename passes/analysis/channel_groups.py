"""Coupled channels: which channels of which parameters must be removed (or permuted) together.

The analysis walks the ATen graph once, asking each op's handler (``passes/handlers``) how channel
*identities* flow through it. Identities live in a union-find: a residual add, a depthwise conv
or q·kᵀ in attention declares two channel positions to be one; a concat or a flatten only
rearranges them. Each resulting class is one prunable *unit*; units that touch the same
parameters form a :class:`ChannelGroup`, the thing a ratio applies to. Removing a unit means
slicing every :class:`ParamSlice` position of it — producers' filters, consumers' input
channels, norm parameters, biases — and resizing the shape arguments that mention it.

An op with no handler is an :class:`UnsupportedOpError` naming the node, unless the recipe lists
it in ``skip``: then the channels touching it are frozen, never guessed to be element-wise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["ChannelGroup", "ChannelGroups", "ParamSlice"]


@dataclass(frozen=True, eq=False)
class ParamSlice:
    """Where a group's units live in one parameter: ``positions[u]`` along ``dim`` belong to unit u.

    role: "out" = a producer's output channels (filters: the usual importance source),
    "in" = a consumer's input channels, "other" = norms, biases, embeddings, additive params.
    """

    target: str
    dim: int
    positions: np.ndarray  # int64 [units, k]
    role: Literal["out", "in", "other"]


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Units that must be removed together; ``frozen`` groups may not be pruned (``reason`` says why)."""

    id: int
    units: int
    slices: tuple[ParamSlice, ...]
    nodes: tuple[str, ...]  # fx nodes whose outputs carry these channels
    frozen: bool = False
    reason: str | None = None

    def slices_by_role(self, role: Literal["out", "in", "other"]) -> tuple[ParamSlice, ...]:
        return tuple(s for s in self.slices if s.role == role)


@dataclass(frozen=True, eq=False)
class ChannelGroups:
    """The analysis result: every group of the graph, frozen ones included."""

    groups: tuple[ChannelGroup, ...]

    def prunable(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if not g.frozen)
