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

from tilefx.errors import VerificationError

__all__ = ["Tapped"]


class Tapped:
    """``Tapped(gm, ["conv2d_1"])(inputs, {"0.weight": w})`` → ``(outputs, [conv2d_1's value])``.

    ``outputs`` is the model's flat output list. Inputs are flattened the way ``torch.export``'s
    module flattens them (positional leaves in order).

    ``cut`` names nodes whose values the caller supplies (``given=[...]`` in the same order)
    instead of computing them: everything only they needed is dropped from the graph. A method
    that re-runs the tail of a network many times on a fixed prefix (DCP's per-layer selection)
    computes the prefix once.

    ``outputs=False`` returns the taps alone and drops everything they do not need: the graph
    runs only as far as its taps (layer-wise reconstruction reads one layer's input at a time).
    """

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        taps: Sequence[str] = (),
        cut: Sequence[str] = (),
        outputs: bool = True,
    ) -> None:
        nodes = {n.name: n for n in gm.graph.nodes}
        missing = [t for t in (*taps, *cut) if t not in nodes]
        if missing:
            raise VerificationError(f"cannot tap or cut nodes {missing}: not in the graph")
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        copied = pytree.tree_leaves(graph.graph_copy(gm.graph, env))
        model_outputs = copied if outputs else []
        graph.output((*model_outputs, *(env[nodes[t]] for t in taps)))
        _cut(graph, [env[nodes[c]] for c in cut])
        if not outputs:
            _keep_only_what_the_output_needs(graph)
        self.module = torch.fx.GraphModule(gm, graph)
        self.taps = tuple(taps)
        self._outputs = len(model_outputs)

    def __call__(
        self,
        inputs: Sequence[Any],
        params: Mapping[str, torch.Tensor] | None = None,
        given: Sequence[torch.Tensor] = (),
    ) -> tuple[list[Any], list[torch.Tensor]]:
        flat = [*pytree.tree_leaves(tuple(inputs)), *given]
        if params:
            result = torch.func.functional_call(self.module, dict(params), tuple(flat), strict=False)
        else:
            result = self.module(*flat)
        result = list(result)
        return result[: self._outputs], result[self._outputs :]


def _cut(graph: torch.fx.Graph, nodes: Sequence[torch.fx.Node]) -> None:
    """Turn ``nodes`` into trailing placeholders and drop what only they needed."""
    last = [n for n in graph.nodes if n.op == "placeholder"][-1:]
    for node in nodes:
        with graph.inserting_after(last[0]) if last else graph.inserting_before(None):
            given = graph.placeholder(f"given_{node.name}")
        node.replace_all_uses_with(given)
        last = [given]
    graph.eliminate_dead_code()


def _keep_only_what_the_output_needs(graph: torch.fx.Graph) -> None:
    """Erase every node the output does not depend on (placeholders stay, the signature is kept).

    Unlike ``eliminate_dead_code`` this also drops nodes fx deems impure (an exported graph's
    ``dropout`` at the end of a model would otherwise keep the whole model alive).
    """
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    needed, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    for node in reversed(list(graph.nodes)):
        if node not in needed and node.op != "placeholder":
            graph.erase_node(node)
