"""The HTML report: what the pipeline did to each layer, in tables and pictures that open offline.

``write_report`` writes ``report.html`` and its PNGs side by side into one directory; the page
refers to them by relative name, so the folder can be zipped, mailed or opened from a file manager
without a network (PNG files rather than base64 keep the HTML small enough to read as text).
Matplotlib is imported only here, and only when a report is written, so ``import tilefx`` stays light.
"""

from __future__ import annotations

import html
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.passes.shape_prop import ShapeProp

from tilefx.passes.analysis.weight_layers import layer_of
from tilefx.passes.graph_utils import attr_tensor
from tilefx.passes.infra.instruments import PassTiming
from tilefx.passes.infra.verify import PassCheck
from tilefx.passes.metadata import (
    BlockSparsity,
    ChannelSelection,
    ElementMask,
    NMSparsity,
    Permutation,
    Quantized,
    get_metadata,
    matrix_view,
    set_metadata,
)

from .graph_capture import capture

__all__ = ["LayerRow", "layer_rows", "max_relative_error", "quantization_summary", "write_report"]

log = logging.getLogger(__name__)

_PICTURED_LAYERS = 3
_SWEPT_SHAPES = 3
_SWEPT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class LayerRow:
    """One weight layer of the optimized graph, as the report's table shows it."""

    node: str
    param: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    channels: str
    sparsity: float
    block: str
    flops_before: float
    flops_after: float
    dense_ms: float | None = None
    kernel_ms: float | None = None
    choice: str = "not compiled"


def layer_rows(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], dense: torch.fx.GraphModule | None = None
) -> list[LayerRow]:
    """Per-layer shapes, kept channels, sparsity and multiply-add FLOPs (2 per kept weight per output)."""
    ShapeProp(gm).propagate(*example_inputs)
    metadata = get_metadata(gm)
    dense_params = dict(dense.named_parameters()) if dense is not None else {}
    rows = []
    for node in gm.graph.nodes:
        layer = layer_of(gm, node)
        if layer is None:
            continue
        weight = attr_tensor(gm, layer.param)
        before = tuple(dense_params[layer.param].shape) if layer.param in dense_params else layer.shape
        positions = _output_positions(node, layer.out_channels)
        kept = int(_kept_mask(metadata, layer.param, weight).sum())
        rows.append(
            LayerRow(
                node=node.name,
                param=layer.param,
                shape_before=before,
                shape_after=tuple(weight.shape),
                channels=_channels(metadata.of(layer.param, ChannelSelection), before, tuple(weight.shape)),
                sparsity=1.0 - kept / max(weight.numel(), 1),
                block=_block(metadata, layer.param),
                flops_before=2.0 * math.prod(before) * positions,
                flops_after=2.0 * kept * positions,
            )
        )
    return rows


def max_relative_error(actual: Any, expected: Any) -> float:
    """max |a − e| / max |e| over all output tensors (the verification instrument's measure)."""
    worst = 0.0
    for a, e in zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected), strict=True):
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            scale = max(float(e.abs().max()), 1e-6)
            worst = max(worst, float((a.double() - e.double()).abs().max()) / scale)
    return worst


def _kept_mask(metadata: Any, name: str, weight: torch.Tensor) -> torch.Tensor:
    records = [
        r for r in metadata.params.get(name, ()) if isinstance(r, (ElementMask, NMSparsity, BlockSparsity))
    ]
    if records:
        return records[-1].element_mask(weight.shape)
    return weight != 0


def _output_positions(node: torch.fx.Node, out_channels: int) -> int:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None:
        return 1
    return max(math.prod(shape) // max(out_channels, 1), 1)


def _channels(selections: list[ChannelSelection], before: tuple[int, ...], after: tuple[int, ...]) -> str:
    if not selections and before == after:
        return "all"
    parts = [f"dim {s.dim}: {len(s.kept)}/{s.original}" for s in selections]
    return ", ".join(parts) if parts else f"{after} of {before}"


def _block(metadata: Any, name: str) -> str:
    blocks = metadata.of(name, BlockSparsity)
    if blocks:
        rows, cols = blocks[-1].block
        return f"{rows}x{cols}"
    if metadata.of(name, NMSparsity):
        record = metadata.of(name, NMSparsity)[-1]
        return f"{record.n}:{record.m}"
    return "element" if metadata.of(name, ElementMask) else "-"


def write_report(
    out_dir: str | os.PathLike[str],
    optimized_gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    dense: torch.fx.GraphModule | None = None,
    timings: Sequence[PassTiming] | None = None,
    measure: bool = True,
) -> Path:
    """Write ``out_dir/report.html`` plus its PNGs; returns the HTML's path.

    ``measure`` compiles the graph with ``tilefx.compile`` (TVM, llvm) and reads the per-layer
    kernel-or-torch choices with their timings; without it, or when TVM cannot compile, the
    latency columns say "not measured". The error column compares ``optimized_gm`` with ``dense``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = tuple(example_inputs)
    rows = layer_rows(optimized_gm, inputs, dense)
    if measure:
        rows = _with_lowering_choices(optimized_gm, rows)
    pictures = _pattern_pictures(out, optimized_gm, rows)
    sections = [
        _summary(optimized_gm, inputs, dense, rows),
        _layer_table(rows),
        _pictures_section(pictures),
        _speedup_section(out, rows, _speedup_sweep(optimized_gm) if measure else {}),
        _timings_section(out, timings or ()),
        _verification_section(get_metadata(optimized_gm).verification),
        _recovery_section(out, get_metadata(optimized_gm).recovery_losses),
        _quantization_section(optimized_gm),
    ]
    page = out / "report.html"
    page.write_text(_page("tilefx report", "\n".join(sections)), encoding="utf-8")
    return page


def _with_lowering_choices(gm: torch.fx.GraphModule, rows: list[LayerRow]) -> list[LayerRow]:
    """Fill latency and choice columns from what ``tilefx.compile`` measured and decided."""
    from tilefx.lowering.build import compile_graph, lowering_choices  # imports tvm

    try:
        compiled = compile_graph(gm, "llvm")
    except Exception as exc:  # noqa: BLE001 - a report without latencies beats no report
        log.warning("report: could not compile for latencies: %s", exc)
        return rows
    choices = {c.node: c for c in lowering_choices(compiled)}
    updated = []
    for row in rows:
        choice = choices.get(row.node)
        if choice is None:
            updated.append(replace(row, choice="dense torch (not block-sparse)"))
            continue
        why = choice.describe().split(": ", 1)[-1]
        updated.append(replace(row, dense_ms=choice.dense_ms, kernel_ms=choice.sparse_ms, choice=why))
    return updated


def _pattern_pictures(out: Path, gm: torch.fx.GraphModule, rows: list[LayerRow]) -> list[tuple[str, str]]:
    """Before/after TETRIS block occupancy of the most-pruned block-sparse layers."""
    metadata = get_metadata(gm)
    block_rows = [r for r in rows if metadata.of(r.param, BlockSparsity)]
    chosen = sorted(block_rows, key=lambda r: -r.sparsity)[:_PICTURED_LAYERS]
    pictures = []
    for index, row in enumerate(chosen):
        record = metadata.of(row.param, BlockSparsity)[-1]
        after = record.element_mask(attr_tensor(gm, row.param).shape)
        before = _unpermuted(after, metadata.of(row.param, Permutation))
        name = f"pattern_{index}.png"
        _plot_patterns(out / name, row, record.block, matrix_view(before), matrix_view(after))
        pictures.append((name, row.param))
    return pictures


def _unpermuted(mask: torch.Tensor, permutations: list[Permutation]) -> torch.Tensor:
    """The kept weights put back in the original channel order (the pattern without reordering)."""
    restored = mask
    for perm in reversed(permutations):
        if perm.dim >= restored.dim() or len(perm.order) != restored.shape[perm.dim]:
            continue
        inverse = torch.empty(len(perm.order), dtype=torch.long)
        inverse[torch.tensor(perm.order)] = torch.arange(len(perm.order))
        restored = restored.index_select(perm.dim, inverse)
    return restored


def _occupancy(mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = block
    grid = mask.float().reshape(mask.shape[0] // rows, rows, mask.shape[1] // cols, cols)
    return grid.mean(dim=(1, 3))


def _plot_patterns(
    path: Path, row: LayerRow, block: tuple[int, int], before: torch.Tensor, after: torch.Tensor
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    for ax, mask, title in (
        (axes[0], before, "before reordering (original channel order)"),
        (axes[1], after, "after TETRIS reordering (as lowered)"),
    ):
        occupancy = _occupancy(mask, block)
        dense_blocks = float((occupancy > 0).float().mean())
        image = ax.imshow(
            occupancy.numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest"
        )
        ax.set_title(
            f"{title}\n{dense_blocks:.0%} of {block[0]}x{block[1]} blocks hold a weight", fontsize=11
        )
        ax.set_xlabel(f"input block (of {occupancy.shape[1]})")
        ax.set_ylabel(f"output block (of {occupancy.shape[0]})")
    fig.colorbar(image, ax=axes, label="fraction of a block's weights kept")
    fig.suptitle(f"{row.param}  {row.shape_after}, sparsity {row.sparsity:.0%}", fontsize=12)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _speedup_sweep(gm: torch.fx.GraphModule) -> dict[str, list[tuple[float, float]]]:
    """Kernel speedup over dense torch at several sparsities, for a few distinct layer shapes.

    Each shape is rebuilt as a one-layer model with random weights, block-pruned (no reordering:
    the kernel's speed depends on how many blocks are kept, not which) and compiled for llvm.
    Bounded: at most ``_SWEPT_SHAPES`` shapes × ``len(_SWEPT_SPARSITIES)`` kernels.
    """
    from tilefx.lowering.build import compile_graph, lowering_choices  # imports tvm

    curves: dict[str, list[tuple[float, float]]] = {}
    for label, module, x, block in _distinct_layers(gm)[:_SWEPT_SHAPES]:
        points = []
        for sparsity in _SWEPT_SPARSITIES:
            try:
                compiled = compile_graph(_block_pruned(module, x, block, sparsity), "llvm")
            except Exception as exc:  # noqa: BLE001 - a report without the curve beats no report
                log.warning("report: speedup sweep of %s at %.2f failed: %s", label, sparsity, exc)
                continue
            for choice in lowering_choices(compiled):
                if choice.sparse_ms and choice.dense_ms:
                    points.append((sparsity, choice.dense_ms / choice.sparse_ms))
        curves[label] = points
    return curves


def _distinct_layers(
    gm: torch.fx.GraphModule,
) -> list[tuple[str, torch.nn.Module, torch.Tensor, tuple[int, int]]]:
    """One-layer stand-ins for the block-sparse layers of ``gm``, largest FLOPs first, one per shape."""
    metadata = get_metadata(gm)
    found: dict[str, tuple[float, str, torch.nn.Module, torch.Tensor, tuple[int, int]]] = {}
    for node in gm.graph.nodes:
        layer = layer_of(gm, node)
        if (
            layer is None
            or layer.transposed
            or layer.groups != 1
            or not metadata.of(layer.param, BlockSparsity)
        ):
            continue
        shape = getattr(node.args[0].meta.get("tensor_meta"), "shape", None)
        if shape is None:
            continue
        module = _stand_in(node, layer.kind, layer.shape)
        if module is None:
            continue
        key = f"{layer.kind} {tuple(layer.shape)} on {tuple(shape)}"
        if key in found:
            continue
        flops = float(math.prod(layer.shape)) * _output_positions(node, layer.out_channels)
        block = metadata.of(layer.param, BlockSparsity)[-1].block
        label = f"{key} ({layer.param.removesuffix('.weight')})"
        found[key] = (flops, label, module, torch.randn(tuple(shape)), block)
    ranked = sorted(found.values(), key=lambda item: -item[0])
    return [(label, module, x, block) for _, label, module, x, block in ranked]


def _block_pruned(
    module: torch.nn.Module, x: torch.Tensor, block: tuple[int, int], sparsity: float
) -> torch.fx.GraphModule:
    """``module`` captured with random blocks of its weight dropped, recorded as ``BlockSparsity``."""
    gm = capture(module, (x,))
    weight = gm.get_parameter("weight")
    rows, cols = block
    grid = (weight.shape[0] // rows, math.prod(weight.shape[1:]) // cols)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(grid[0] * grid[1], generator=generator)
    mask = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    mask[order[: max(round((1 - sparsity) * mask.numel()), 1)]] = True
    record = BlockSparsity(block, mask.reshape(grid))
    with torch.no_grad():
        weight.mul_(record.element_mask(weight.shape).to(weight.dtype))
    set_metadata(gm, get_metadata(gm).with_annotation("weight", record))
    return gm


def _stand_in(node: torch.fx.Node, kind: str, shape: tuple[int, ...]) -> torch.nn.Module | None:
    if kind == "linear" and len(shape) == 2:
        return torch.nn.Linear(shape[1], shape[0])
    if kind != "conv" or len(shape) != 4:
        return None
    args = [*node.args, *([None] * 7)]
    stride, padding, dilation = (
        tuple(a) if isinstance(a, (list, tuple)) else default
        for a, default in zip(args[3:6], ((1, 1), (0, 0), (1, 1)), strict=True)
    )
    return torch.nn.Conv2d(shape[1], shape[0], (shape[2], shape[3]), stride, padding, dilation)


def _speedup_section(out: Path, rows: list[LayerRow], curves: dict[str, list[tuple[float, float]]]) -> str:
    measured = [r for r in rows if r.dense_ms and r.kernel_ms]
    if not measured and not any(curves.values()):
        return "<h2>Speedup vs sparsity</h2><p>Not measured (run with measure=True and TVM installed).</p>"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), constrained_layout=True)
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot([100 * v for v in xs], ys, marker="o", label=f"{label} (sweep)")
    if measured:
        xs2 = [100 * r.sparsity for r in measured]
        ys2 = [(r.dense_ms or 0.0) / (r.kernel_ms or 1.0) for r in measured]
        ax.scatter(xs2, ys2, color="black", marker="x", zorder=3, label="this model's layers (as compiled)")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="dense torch")
    ax.set_xlabel("layer sparsity (%)")
    ax.set_ylabel("speedup of the kernel over dense torch (x)")
    ax.set_title("Block-sparse kernel vs dense torch (llvm, best of interleaved runs)")
    ax.legend(fontsize=9)
    fig.savefig(out / "speedup.png", dpi=90)
    plt.close(fig)
    return (
        '<h2>Speedup vs sparsity</h2><img src="speedup.png" alt="speedup vs sparsity">'
        "<p>Lines: one-layer stand-ins of the model's largest distinct layer shapes, random weights with "
        "random blocks dropped, compiled for llvm at each sparsity. Crosses: the model's own layers as "
        "tilefx.compile measured them. Each point is the median of interleaved measurements on this host, "
        "so a loaded machine makes them noisy; benchmarks/ holds the repeated measurements.</p>"
    )


def _timings_section(out: Path, timings: Sequence[PassTiming]) -> str:
    if not timings:
        return "<h2>Pass timings</h2><p>Not recorded (pass a TimingInstrument's timings).</p>"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.4 * len(timings) + 1.2), constrained_layout=True)
    names = [f"{i}. {t.name}" for i, t in enumerate(timings)]
    ax.barh(
        names,
        [t.seconds for t in timings],
        color=["tab:orange" if t.modified else "tab:grey" for t in timings],
    )
    ax.invert_yaxis()
    ax.set_xlabel("seconds (orange: the pass modified the graph)")
    fig.savefig(out / "timings.png", dpi=90)
    plt.close(fig)
    table = _table(
        ["pass", "modified", "seconds"],
        [[t.name, "yes" if t.modified else "no", f"{t.seconds:.3f}"] for t in timings],
    )
    return f'<h2>Pass timings</h2><img src="timings.png" alt="pass timings">{table}'


def _verification_section(checks: Sequence[PassCheck]) -> str:
    """Each modifying pass's output comparison, as the verification instrument made it."""
    if not checks:
        return "<h2>Verification</h2><p>Not recorded (verification off, or a graph not made by optimize).</p>"
    table = _table(
        ["pass", "compared with", "max relative error", "decided in"],
        [[c.pass_name, c.reference, f"{c.relative_error:.2e}", c.precision] for c in checks],
    )
    return (
        "<h2>Verification</h2><p>After every modifying pass its outputs on the example inputs were "
        "compared with what the pass claims: the unchanged model for exact passes, the model with the "
        "pruned weights zeroed for pruning passes (error relative to the largest output).</p>" + table
    )


def _recovery_section(out: Path, losses: Sequence[float]) -> str:
    if not losses:
        return "<h2>Recovery</h2><p>No recovery training ran.</p>"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4), constrained_layout=True)
    ax.plot(range(1, len(losses) + 1), losses, color="tab:blue")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean loss (distillation from the dense model)")
    ax.set_title("Recovery training loss")
    fig.savefig(out / "recovery.png", dpi=90)
    plt.close(fig)
    return (
        '<h2>Recovery</h2><img src="recovery.png" alt="recovery loss">'
        f"<p>{len(losses)} steps: loss {losses[0]:.4g} at the first, {losses[-1]:.4g} at the last. "
        "No quality metric is recorded per step.</p>"
    )


def quantization_summary(gm: torch.fx.GraphModule) -> str | None:
    """One line on what ``Recipe.quantize`` did (None if it did not run): the quantized weights
    by format and scheme, and those the accuracy-aware fallback returned to fp32 with their cost."""
    metadata = get_metadata(gm)
    records = [r for records in metadata.params.values() for r in records if isinstance(r, Quantized)]
    if not records and not metadata.quantization:
        return None
    kinds = sorted({f"{r.format} ({r.scheme})" if r.format == "int8" else r.format for r in records})
    line = f"quantized: {len(records)} linear weights, {', '.join(kinds) or 'none'}"
    returned = [c for c in metadata.quantization if not c.quantized]
    if metadata.quantization:
        named = ", ".join(f"{c.param} (cost {c.cost:.2e})" for c in returned) or "none"
        line += f"; returned to fp32 by the tolerance: {named}"
    return line


def _quantization_section(gm: torch.fx.GraphModule) -> str:
    """Per quantized weight: format, activation grid, and the fallback's cost where it measured one."""
    summary = quantization_summary(gm)
    if summary is None:
        return "<h2>Quantization</h2><p>No layer was quantized.</p>"
    metadata = get_metadata(gm)
    costs = {c.param: c for c in metadata.quantization}
    rows = []
    for name, records in metadata.params.items():
        for record in records:
            if isinstance(record, Quantized):
                grid = (
                    "per row, at run time"
                    if record.scheme == "dynamic"
                    else (f"scale {record.act_scale:.3g}, zero point {record.act_zero_point}")
                )
                weights = "per channel" if record.per_channel else "per tensor"
                cost = f"{costs[name].cost:.2e}" if name in costs else "not measured"
                rows.append([name, record.format, grid if record.format == "int8" else "bf16", weights, cost])
    rows += [
        [c.param, "fp32 (returned)", "", "", f"{c.cost:.2e}"]
        for c in metadata.quantization
        if not c.quantized
    ]
    table = _table(
        ["weight", "format", "activations", "int8 weight scales", "cost (output error alone)"], rows
    )
    return f"<h2>Quantization</h2><p>{html.escape(summary)}</p>{table}"


def _summary(
    gm: torch.fx.GraphModule,
    inputs: tuple[Any, ...],
    dense: torch.fx.GraphModule | None,
    rows: list[LayerRow],
) -> str:
    flops_before = sum(r.flops_before for r in rows)
    flops_after = sum(r.flops_after for r in rows)
    items = [
        f"weight layers: {len(rows)}",
        f"multiply-add FLOPs: {flops_before / 1e9:.3f} G before, {flops_after / 1e9:.3f} G after",
    ]
    if dense is not None:
        with torch.no_grad():
            error = max_relative_error(gm(*inputs), dense(*inputs))
        items.append(
            f"verification: max |optimized − dense| / max |dense| on the example inputs = {error:.3e} "
            "(pruning changes outputs by design; exact passes are verified per pass)"
        )
    return "<h2>Summary</h2><ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


def _layer_table(rows: list[LayerRow]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    body = [
        [
            r.param.removesuffix(".weight"),
            str(r.shape_before),
            str(r.shape_after),
            r.channels,
            f"{r.sparsity:.0%}",
            r.block,
            f"{r.flops_before / 1e6:.1f}",
            f"{r.flops_after / 1e6:.1f}",
            ms(r.dense_ms),
            ms(r.kernel_ms),
            r.choice,
        ]
        for r in rows
    ]
    header = [
        "layer",
        "shape before",
        "shape after",
        "channels kept",
        "sparsity",
        "block",
        "MFLOPs before",
        "MFLOPs after",
        "dense ms",
        "kernel ms",
        "lowering and why",
    ]
    return "<h2>Layers</h2>" + _table(header, body)


def _pictures_section(pictures: list[tuple[str, str]]) -> str:
    if not pictures:
        return "<h2>Block patterns</h2><p>No block-sparse layer.</p>"
    images = "".join(
        f'<figure><img src="{n}" alt="{html.escape(p)}"><figcaption>{html.escape(p)}</figcaption></figure>'
        for n, p in pictures
    )
    return (
        "<h2>Block patterns before and after TETRIS reordering</h2>"
        "<p>Dark: blocks whose weights are kept. Reordering gathers kept weights into whole blocks, "
        "so fewer blocks hold a weight and the kernel skips more.</p>" + images
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; }
th { background: #eef; position: sticky; top: 0; }
tr:nth-child(even) { background: #f8f8f8; }
img { max-width: 100%; }
figure { margin: 0 0 1.5em 0; }
"""


def _page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )
