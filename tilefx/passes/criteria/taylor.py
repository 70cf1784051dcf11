"""The criterion "taylor": first-order Taylor importance (Molchanov et al., CVPR 2019) on weights.

From calibration batches ``(inputs, labels)`` and cross-entropy unless the ``Calibration`` has a
loss of its own. Per batch, with ``c[s, u] = Σ w·∂L/∂w`` over the elements of slice s at unit u:
``reduction="group"`` (default, the paper's group contribution) scores ``(Σ_s c[s, u])²``, the
squared first-order loss change of removing the whole unit; ``reduction="slice"`` scores
``Σ_s c[s, u]²``. Scores are averaged over batches (the paper averages over mini-batches). Only
parameters enter (buffers such as running statistics have no gradient here).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.fx

from tilefx.errors import RecipeError

from ..analysis.channel_groups import ChannelGroup
from ..training.calibration import Calibration, as_calibration
from .base import ChannelScores, Criterion, Reduction, ScoringInputs, unit_rows

__all__ = ["TAYLOR", "taylor_scores"]


def _taylor(
    gm: torch.fx.GraphModule, groups: tuple[ChannelGroup, ...], inputs: ScoringInputs
) -> ChannelScores:
    data = as_calibration(inputs.calibration, 'criterion "taylor"')
    return ChannelScores("taylor", taylor_scores(gm, groups, data, inputs.reduction))


def taylor_scores(
    gm: torch.fx.GraphModule,
    groups: Iterable[ChannelGroup],
    calibration: Calibration,
    reduction: Reduction = "group",
) -> dict[int, torch.Tensor]:
    """First-order Taylor scores, averaged over the calibration batches (see the module docstring)."""
    groups = tuple(groups)
    parameters = dict(gm.named_parameters(remove_duplicate=False))
    targets = sorted({s.target for g in groups for s in g.slices if s.target in parameters})
    totals = {g.id: torch.zeros(g.units, dtype=torch.float64) for g in groups}
    batches = 0
    for inputs, labels in calibration:
        weights = {t: parameters[t].detach().requires_grad_() for t in targets}
        output = torch.func.functional_call(gm, weights, inputs, strict=False)
        loss = calibration.loss_of(output, labels)
        grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
        products = {
            t: (w.detach() * g).double()
            for (t, w), g in zip(weights.items(), grads, strict=True)
            if g is not None
        }
        for group in groups:
            totals[group.id] += _taylor_batch(group, products, reduction)
        batches += 1
    if batches == 0:
        raise RecipeError('criterion "taylor": the calibration data yielded no batches')
    return {gid: total / batches for gid, total in totals.items()}


def _taylor_batch(
    group: ChannelGroup, products: Mapping[str, torch.Tensor], reduction: Reduction
) -> torch.Tensor:
    contributions = [
        unit_rows(products[s.target], s).sum(dim=1) for s in group.slices if s.target in products
    ]
    if not contributions:
        return torch.zeros(group.units, dtype=torch.float64)
    stacked = torch.stack(contributions)  # [slices, units]
    if reduction == "group":
        return stacked.sum(dim=0).square()
    return stacked.square().sum(dim=0)


TAYLOR = Criterion("taylor", _taylor, needs_calibration=True)
