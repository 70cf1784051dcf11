"""Run an fx GraphModule functionally and read chosen intermediate nodes, with autograd intact.

Training-time methods need a layer's input or output inside the graph (DCP's reconstruction
target, an auxiliary head's feature map). :class:`Tapped` builds, once, a sibling GraphModule
whose graph is a copy of the model's with a flat output ``(*model outputs, *tapped nodes)``. It
shares the model's parameter objects (nothing is copied), and every call can replace some of
them by name (``torch.func.functional_call``), so a criterion can differentiate with respect to a
weight without touching the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from ..infra.errors import VerificationError

__all__ = ["Tapped"]


class Tapped:
    """``Tapped(gm, ["conv2d_1"])(inputs, {"0.weight": w})`` → ``(outputs, [conv2d_1's value])``.

    ``outputs`` is the model's flat output list. Inputs are flattened the way ``torch.export``'s
    module flattens them (positional leaves in order).
    """

    def __init__(self, gm: torch.fx.GraphModule, taps: Sequence[str] = ()) -> None:
        nodes = {n.name: n for n in gm.graph.nodes}
        missing = [t for t in taps if t not in nodes]
        if missing:
            raise VerificationError(f"cannot tap nodes {missing}: not in the graph")
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        outputs = graph.graph_copy(gm.graph, env)
        graph.output((*pytree.tree_leaves(outputs), *(env[nodes[t]] for t in taps)))
        self.module = torch.fx.GraphModule(gm, graph)
        self.taps = tuple(taps)
        self._outputs = len(pytree.tree_leaves(outputs))

    def __call__(
        self, inputs: Sequence[Any], params: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[list[Any], list[torch.Tensor]]:
        flat = pytree.tree_leaves(tuple(inputs))
        if params:
            result = torch.func.functional_call(self.module, dict(params), tuple(flat), strict=False)
        else:
            result = self.module(*flat)
        result = list(result)
        return result[: self._outputs], result[self._outputs :]
