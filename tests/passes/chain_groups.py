"""Hand-built channel groups for plain conv chains, so criteria are testable without the analysis.

Each conv/linear's output channels form one group: the producer's weight (and bias) as "out",
batch-norm parameters between it and the next layer as "other", the next conv/linear's weight as
"in". Only element-wise ops, batch norm and global pooling may sit in between (test models only).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx

from tilefx.passes.analysis.channel_groups import ChannelGroup, ChannelGroups, ParamSlice

aten = torch.ops.aten
LAYERS = {aten.conv2d.default, aten.linear.default}
PASS_THROUGH = {aten.relu.default, aten.batch_norm.default, aten.mean.dim, aten.flatten.using_ints}


def chain_groups(gm: torch.fx.GraphModule) -> ChannelGroups:
    groups = []
    for node in gm.graph.nodes:
        if node.target not in LAYERS:
            continue
        weight = gm.get_parameter(node.args[1].target)
        units = weight.shape[0]
        ident = np.arange(units, dtype=np.int64).reshape(units, 1)
        slices = [ParamSlice(node.args[1].target, 0, ident, "out")]
        if len(node.args) > 2 and node.args[2] is not None:
            slices.append(ParamSlice(node.args[2].target, 0, ident, "other"))
        nodes, current, frozen = [node.name], node, True
        while len(current.users) == 1:
            (user,) = current.users
            if user.target in LAYERS:
                slices.append(ParamSlice(user.args[1].target, 1, ident, "in"))
                frozen = False
                break
            if user.target not in PASS_THROUGH:
                break
            if user.target == aten.batch_norm.default:
                slices += [ParamSlice(a.target, 0, ident, "other") for a in user.args[1:5]]
            nodes.append(user.name)
            current = user
        groups.append(
            ChannelGroup(
                len(groups), units, tuple(slices), tuple(nodes), frozen, "output" if frozen else None
            )
        )
    # criteria read only the groups; the union-find trace is PruneChannelsPass's business
    return ChannelGroups(tuple(groups), trace=None, roots=())  # type: ignore[arg-type]
