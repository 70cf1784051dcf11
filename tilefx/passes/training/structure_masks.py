"""Channel-mask wrappers: the graph rewrite that lets a training method switch channels on and off.

:func:`wrap_channel_masks` puts a :class:`ChannelMask` (a ``call_module`` node) between every
parameter a prunable channel group touches and that parameter's users, so the forward pass uses
``param ⊙ mask`` expanded over the unit's positions. A unit whose mask is 0 has every slice of it
zeroed — producers' filters and biases, consumers' input channels, norm parameters — which is the
model with that unit removed wherever removing it is exact (everywhere but norms that average
over channels). Masks are buffers the training method replaces (never edits in place: autograd
keeps the tensor a forward used), so two forwards with different masks can share one backward.

The wrappers are not ATen ops: :class:`~tilefx.passes.materialize_masks.MaterializeChannelMasksPass`
folds them into the parameters before any other pass sees the graph (every pass that needs an
ATen graph refuses a wrapped one with a PreconditionError).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn

from ..analysis.channel_groups import ChannelGroup
from ..graph_utils import attr_tensor

__all__ = ["MASKS_MODULE", "ChannelMask", "WrappedGroup", "channel_masks", "wrap_channel_masks"]

MASKS_MODULE = "structure_masks"
"""The submodule of the graph module that holds every group's :class:`ChannelMask`."""


class ChannelMask(nn.Module):
    """One channel group's mask, applied to each of the group's parameter slices.

    ``unit_of_<i>`` maps every position along slice i's dim to its unit, or to ``units`` (a
    constant 1) for positions of other groups.
    """

    mask: torch.Tensor

    def __init__(self, group: ChannelGroup, shapes: Sequence[tuple[int, ...]]) -> None:
        super().__init__()
        self.units = group.units
        self.register_buffer("mask", torch.ones(group.units))
        self.dims: list[int] = []
        self.ranks: list[int] = []
        for index, (piece, shape) in enumerate(zip(group.slices, shapes, strict=True)):
            unit_of = torch.full((shape[piece.dim],), group.units, dtype=torch.long)
            for unit, positions in enumerate(piece.positions.tolist()):
                unit_of[positions] = unit
            self.register_buffer(f"unit_of_{index}", unit_of)
            self.dims.append(piece.dim)
            self.ranks.append(len(shape))

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace (not edit) the mask, so a graph that used the old one keeps it for backward."""
        self.mask = mask.detach().to(self.mask.dtype).clone()

    def forward(self, param: torch.Tensor, index: int) -> torch.Tensor:
        unit_of: torch.Tensor = getattr(self, f"unit_of_{index}")
        padded = torch.cat([self.mask, self.mask.new_ones(1)])
        shape = [1] * self.ranks[index]
        shape[self.dims[index]] = -1
        return param * padded[unit_of].reshape(shape).to(param.dtype)


@dataclass(frozen=True, eq=False)
class WrappedGroup:
    """A group and the mask module wrapping its slices (at ``structure_masks.<key>``)."""

    group: ChannelGroup
    mask: ChannelMask
    key: str


def wrap_channel_masks(gm: torch.fx.GraphModule, groups: Sequence[ChannelGroup]) -> list[WrappedGroup]:
    """Wrap every floating parameter slice of ``groups`` in its group's mask (in place, all ones).

    A parameter read by several get_attr nodes is wrapped at each; a parameter in several groups
    (a conv weight: filters in one, input channels in another) goes through each group's mask.
    """
    container = nn.ModuleDict()
    gm.add_submodule(MASKS_MODULE, container)
    wrapped = []
    readers = _readers(gm)
    for group in groups:
        pieces = [(i, p) for i, p in enumerate(group.slices) if attr_tensor(gm, p.target).is_floating_point()]
        if not pieces:
            continue
        module = ChannelMask(group, [tuple(attr_tensor(gm, p.target).shape) for p in group.slices])
        key = f"g{group.id}"
        container[key] = module
        wrapped.append(WrappedGroup(group, module, key))
        for index, piece in pieces:
            for reader in readers.get(piece.target, []):
                _wrap_reader(gm, readers, piece.target, reader, f"{MASKS_MODULE}.{key}", index)
    gm.graph.lint()
    gm.recompile()
    return wrapped


def _readers(gm: torch.fx.GraphModule) -> dict[str, list[torch.fx.Node]]:
    """Per parameter target, the node whose users read it: first its get_attr node(s)."""
    found: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            found.setdefault(str(node.target), []).append(node)
    return found


def _wrap_reader(
    gm: torch.fx.GraphModule,
    readers: dict[str, list[torch.fx.Node]],
    target: str,
    reader: torch.fx.Node,
    module: str,
    index: int,
) -> None:
    """Insert ``module(reader, index)`` after ``reader``; its users read the wrapper instead."""
    with gm.graph.inserting_after(reader):
        wrapper = gm.graph.call_module(module, (reader, index))
    reader.replace_all_uses_with(wrapper, delete_user_cb=lambda user: user is not wrapper)
    position = readers[target].index(reader)
    readers[target][position] = wrapper  # a later group's mask wraps this one


def channel_masks(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The graph's mask-wrapper nodes, in graph order."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), ChannelMask)
    ]
