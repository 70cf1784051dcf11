"""Fold training-time channel-mask wrappers into the weights they wrap, leaving a plain ATen graph."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from tilefx.errors import PreconditionError

from .graph_utils import attr_tensor, set_attr_tensor, unique_attr_name
from .infra.analysis_manager import AnalysisManager
from .infra.pass_base import PassBase, PassResult
from .training.structure_masks import MASKS_MODULE, ChannelMask, channel_masks

__all__ = ["MaterializeChannelMasksPass"]


@dataclass(frozen=True)
class MaterializeChannelMasksPass(PassBase):
    """Replace every ``ChannelMask(param, i)`` node by a parameter holding ``param ⊙ mask``.

    A parameter read only through its wrapper is overwritten in place; one also read unmasked
    elsewhere gets a new attribute. Chains (a weight in two groups) fold one wrapper at a time,
    in graph order. The masks' submodule is deleted, so no training wrapper is left behind.
    Exact: the folded model computes the wrapped one's outputs (the same products, done once).
    Requires: every wrapper reads a parameter (get_attr), as ``wrap_channel_masks`` builds them.
    """

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        wrappers = channel_masks(gm)
        for node in wrappers:
            self._fold(gm, node)
        if hasattr(gm, MASKS_MODULE):
            gm.delete_submodule(MASKS_MODULE)
        if not wrappers:
            return PassResult(gm, modified=False)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified=True)

    def _fold(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
        source, index = node.args[0], node.args[1]
        if not isinstance(source, torch.fx.Node) or source.op != "get_attr" or not isinstance(index, int):
            raise PreconditionError(
                self.name, node.name, "a channel-mask wrapper must read a parameter (get_attr)",
                "build wrappers with tilefx.passes.training.structure_masks.wrap_channel_masks",
            )  # fmt: skip
        module = gm.get_submodule(str(node.target))
        assert isinstance(module, ChannelMask)
        with torch.no_grad():
            folded = module(attr_tensor(gm, str(source.target)), index)
        if len(source.users) == 1:
            set_attr_tensor(gm, str(source.target), folded)
            node.replace_all_uses_with(source)
        else:
            name = unique_attr_name(gm, str(source.target).replace(".", "_") + "_masked")
            set_attr_tensor(gm, name, folded)
            with gm.graph.inserting_before(node):
                reader = gm.graph.get_attr(name)
            node.replace_all_uses_with(reader)
        gm.graph.erase_node(node)
