"""Layer-wise reconstruction: prune each layer to its target at once, then refit what it keeps.

Why: one-shot magnitude pruning of all-MiniLM-L6-v2 at 80% 16×1 leaves a sentence-embedding cosine
to the dense model of 0.10; distillation then spends much of its budget undoing damage that a
closed-form solve per layer removes in about a minute of calibration forwards (cosine 0.64 before
any training). For each pruned layer, in graph order, with ``X_s`` its input in the model pruned so
far and ``X_d`` its input in the dense model, on the same calibration batches:

- **which blocks go** — the Optimal Brain Surgeon saliency (Hassibi & Stork 1993, in SparseGPT's
  form, Frantar & Alistarh 2023): ``w² / U_jj²`` with ``U`` the upper Cholesky factor of
  ``(X_sᵀX_s + λI)⁻¹``, summed over each block; the ``floor(s · #blocks)`` lowest are dropped,
  counted as ``PruneBlocksPass`` counts them;
- **what the rest become** — per block-row (its rows keep the same columns), the least-squares fit
  ``min ‖W_K X_s,K − W_d X_d‖²`` of the kept weights (and the bias) to the *dense* layer's output on
  the *dense* input. Its normal equations ``(X_s,Kᵀ X_s,K + λI) W_Kᵀ = (X_sᵀ X_d W_dᵀ)_K`` need only
  the Gram matrices ``H_ss = X_sᵀX_s`` and ``H_sd = X_sᵀX_d``, summed batch by batch in float64.
  Aiming at the dense input's output (SparseGPT aims at the pruned input's) lets every layer also
  absorb the error of the layers before it.

Layers that share an input (a transformer's q/k/v) share one pass over the data. Each pass runs the
graph only up to that input (:class:`Tapped` with ``outputs=False``). Linear layers and ungrouped
2-d convolutions (through ``unfold``) are reconstructed; any other pruned weight is left to the
caller's magnitude selection. Rows are tokens: with a token mask, padding positions are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from tqdm import tqdm

from ..analysis.weight_layers import WeightLayer, weight_layers
from ..graph_utils import param_node
from ..metadata import ChannelSelection, get_metadata, matrix_view
from .calibration import Calibration
from .gradual_pruning import MaskedWeight, lowest_block_mask
from .loop import broadcast_from_rank0, show_progress
from .taps import Tapped

__all__ = ["dense_weight", "input_gram", "reconstruct", "refit"]


def reconstruct(
    student: torch.fx.GraphModule,
    teacher: torch.fx.GraphModule,
    weights: Sequence[MaskedWeight],
    data: Calibration,
    batches: int,
    token_mask: int | None = None,
    damp: float = 0.01,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Prune and refit ``weights`` of ``student`` in place; return their block keep-masks by name.

    ``teacher`` is the dense model in the student's coordinates (same node and parameter names).
    ``batches``: how many calibration batches to read. ``damp``: λ as a fraction of the mean
    diagonal of ``H_ss``. Weights this cannot reconstruct are absent from the result.
    """
    layers = {layer.param: layer for layer in weight_layers(student)}
    groups: dict[str, list[tuple[MaskedWeight, WeightLayer]]] = {}
    for w in weights:
        layer = layers.get(w.name)
        if layer is not None and _supported(layer):
            groups.setdefault(layer.input.name, []).append((w, layer))
    order = {node.name: i for i, node in enumerate(student.graph.nodes)}
    data_batches = [inputs for inputs, _ in islice(iter(data), batches)]
    keep: dict[str, torch.Tensor] = {}
    bar = tqdm(
        sorted(groups.items(), key=lambda item: order[item[0]]),
        desc="reconstruct",
        disable=not show_progress(progress),
        dynamic_ncols=True,
    )
    teacher_nodes = {n.name for n in teacher.graph.nodes}
    for node, group in bar:
        if node not in teacher_nodes:  # a node a pass created: the dense model has no such input
            continue
        h_ss, h_sd = _grams(
            Tapped(student, [node], outputs=False),
            Tapped(teacher, [node], outputs=False),
            group[0][1],  # the group's layers read the same input
            data_batches,
            token_mask,
        )
        for w, layer in group:
            keep[w.name] = refit(student, dense_weight(student, teacher, w.name), w, layer, h_ss, h_sd, damp)
    return keep


def _supported(layer: WeightLayer) -> bool:
    return not layer.transposed and (layer.kind == "linear" or layer.groups == 1)


def input_gram(
    gm: torch.fx.GraphModule,
    layer: WeightLayer,
    batches: Sequence[tuple[object, ...]],
    token_mask: int | None,
) -> torch.Tensor:
    """``XᵀX`` per row of ``layer``'s input in ``gm`` (a ones column appended when it has a bias)."""
    tapped = Tapped(gm, [layer.input.name], outputs=False)
    return _grams(tapped, tapped, layer, batches, token_mask)[0]


def _grams(
    student: Tapped,
    teacher: Tapped,
    layer: WeightLayer,
    batches: Sequence[tuple[object, ...]],
    token_mask: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``H_ss = X_sᵀX_s`` and ``H_sd = X_sᵀX_d`` per row, a ones column appended when there is a bias."""
    h_ss = h_sd = torch.zeros(())
    rows = 0
    with torch.no_grad():
        for inputs in batches:
            mask = None if token_mask is None else pytree.tree_leaves(tuple(inputs))[token_mask]
            x_s = _rows(student(inputs)[1][0], layer, mask)
            x_d = _rows(teacher(inputs)[1][0], layer, mask)
            h_ss = h_ss + x_s.T @ x_s
            h_sd = h_sd + x_s.T @ x_d
            rows += x_s.shape[0]
    return h_ss / max(rows, 1), h_sd / max(rows, 1)


def _rows(x: torch.Tensor, layer: WeightLayer, mask: torch.Tensor | None) -> torch.Tensor:
    """The layer's input as a ``[rows, matrix-view columns (+1)]`` float64 matrix."""
    if layer.kind == "conv":
        stride, padding, dilation = layer.conv_geometry
        x = F.unfold(x, layer.shape[2:], dilation=dilation, padding=padding, stride=stride)  # type: ignore[arg-type]
        x = x.transpose(1, 2)  # [N, L, C·kh·kw]
    elif mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.bool()]
    x = x.reshape(-1, x.shape[-1]).double()
    if layer.bias is not None:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
    return x


def dense_weight(
    student: torch.fx.GraphModule, teacher: torch.fx.GraphModule, name: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's matrix view and bias of the layer ``name``, on the student's output rows.

    The same tensors as the student's before any refit when only blocks are pruned; after channel
    pruning the teacher keeps every input column (its input is the dense one) and the student's
    kept output channels select its rows (``ChannelSelection`` on dim 0).
    """
    weight = matrix_view(teacher.get_parameter(name).detach()).double()
    layer = next(layer for layer in weight_layers(teacher) if layer.param == name)
    bias_name = None if layer.bias is None else param_node(layer.bias)
    bias = None if bias_name is None else teacher.get_parameter(bias_name).detach().double()
    rows = [r for r in get_metadata(student).of(name, ChannelSelection) if r.dim == 0]
    if rows:
        kept = torch.as_tensor(rows[-1].kept)
        weight, bias = weight[kept], None if bias is None else bias[kept]
    return weight, bias


def refit(
    gm: torch.fx.GraphModule,
    dense_weight: tuple[torch.Tensor, torch.Tensor | None],
    w: MaskedWeight,
    layer: WeightLayer,
    h_ss: torch.Tensor,
    h_sd: torch.Tensor,
    damp: float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Select ``w``'s blocks by OBS saliency (or take ``keep``, a block keep-mask), refit the kept
    weights (and bias) to the dense layer's output ``dense_weight`` computes from the dense input;
    return the keep mask."""
    bias = None if layer.bias is None else param_node(layer.bias)
    weight = matrix_view(w.weight.detach()).double()
    teacher, teacher_bias = dense_weight
    dense = teacher if teacher_bias is None else torch.cat([teacher, teacher_bias[:, None]], 1)
    out, columns = weight.shape
    h = h_ss + damp * h_ss.diagonal().mean().clamp_min(1e-12) * torch.eye(h_ss.shape[0], dtype=h_ss.dtype)
    if keep is None:
        keep = _select(weight, h[:columns, :columns], w.block, w.sparsity)
    broadcast_from_rank0(keep)
    target = dense @ h_sd.T  # [out, student columns (+1)]: X_sᵀ X_d w_d for every row
    kept = keep.repeat_interleave(w.block[1], 1)
    refit = torch.zeros(out, h_ss.shape[0], dtype=torch.float64)
    rows = w.block[0]
    patterns, which = torch.unique(kept, dim=0, return_inverse=True)  # block-rows sharing columns
    for index, pattern in enumerate(patterns):
        columns_kept = pattern.nonzero().flatten()
        if bias is not None:
            columns_kept = torch.cat([columns_kept, columns_kept.new_tensor([columns])])
        if not columns_kept.numel():
            continue
        block_rows = (which == index).nonzero().flatten()
        out_rows = (block_rows[:, None] * rows + torch.arange(rows)).flatten()
        solved = torch.linalg.solve(h[columns_kept][:, columns_kept], target[out_rows][:, columns_kept].T)
        refit[out_rows[:, None], columns_kept] = solved.T
    broadcast_from_rank0(refit)
    with torch.no_grad():
        w.weight.copy_(refit[:, :columns].reshape(w.weight.shape).to(w.weight.dtype))
        if bias is not None:
            gm.get_parameter(bias).copy_(refit[:, columns].to(w.weight.dtype))
    return keep


def _select(weight: torch.Tensor, h: torch.Tensor, block: tuple[int, int], sparsity: float) -> torch.Tensor:
    """Block keep-mask: the ``floor(sparsity · #blocks)`` blocks of lowest summed OBS saliency dropped."""
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return lowest_block_mask(weight.pow(2) / u.diagonal().pow(2), block, sparsity)
