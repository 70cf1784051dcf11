"""Block-pruning coverage: per model, weights block-pruned / eligible, layers the plan lowers, and why not.

The same 83 models as ``channel_coverage.py`` (its model list and loaders are imported, not
copied) plus T5's encoder and BART from small configs. Each is optimized with
``Recipe(blocks=BlockPruning(block=(16, 1), sparsity=0.8, reorder=...))`` (verification on), then:
eligible = linear / conv / matmul-with-a-parameter weights (``weight_layers(matmul_weights=True)``);
pruned = those with a ``BlockSparsity`` record; every weight left dense with its reason (grouped);
lowered = the layers ``lowering.plan.plan_graph`` would turn into kernels (TVM-free: no kernel is
compiled), or the ``LoweringError`` it raises. A model that fails gets its typed error.

    OMP_NUM_THREADS=1 python benchmarks/block_coverage.py --quick
    OMP_NUM_THREADS=1 python benchmarks/block_coverage.py --shard 1/4 --out /tmp/blocks.jsonl  # ... 4/4
    python benchmarks/block_coverage.py --summary --out /tmp/blocks.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import channel_coverage  # noqa: E402

import tilefx  # noqa: E402
from tilefx.errors import LoweringError  # noqa: E402
from tilefx.lowering.plan import plan_graph  # noqa: E402
from tilefx.passes.analysis.weight_layers import WeightLayer, weight_layers  # noqa: E402
from tilefx.passes.metadata import BlockSparsity, get_metadata  # noqa: E402

BLOCK = (16, 1)
SPARSITY = 0.8


def t5() -> tuple[nn.Module, tuple[Any, ...]]:
    import transformers

    config = transformers.T5Config(vocab_size=500, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                   use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    return transformers.T5EncoderModel(config).eval(), (torch.randint(0, 500, (1, 12)),)


def bart() -> tuple[nn.Module, tuple[Any, ...]]:
    import transformers

    config = transformers.BartConfig(vocab_size=500, d_model=64, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                     decoder_ffn_dim=128, max_position_embeddings=64, use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    return transformers.BartModel(config).eval(), (torch.randint(0, 500, (1, 12)),)


EXTRA: dict[str, Callable[[], tuple[nn.Module, tuple[Any, ...]]]] = {"t5": t5, "bart": bart}
QUICK = (*channel_coverage.QUICK, *EXTRA)


def all_models() -> list[str]:
    return channel_coverage.all_models() + list(EXTRA)


def build(name: str) -> tuple[nn.Module, tuple[Any, ...]]:
    return EXTRA[name]() if name in EXTRA else channel_coverage.build(name)


def dense_reason(layer: WeightLayer) -> str:
    """Why a weight kept no block record, in words that group (no layer names)."""
    sides = [
        side
        for side, size, block in (
            ("output", layer.out_channels, BLOCK[0]),
            ("input", layer.in_channels, BLOCK[1]),
        )
        if size % block
    ]
    if sides:
        return f"block {BLOCK} does not divide its {' or '.join(sides)} channels"
    return "not selected / not pruned"


def measure(name: str, reorder: str) -> dict[str, Any]:
    """One JSON line for one model."""
    model, inputs = build(name)
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=BLOCK, sparsity=SPARSITY, reorder=reorder))  # type: ignore[arg-type]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = tilefx.optimize(model, inputs, recipe)
    layers = weight_layers(gm, matmul_weights=True)
    metadata = get_metadata(gm)
    pruned = [layer for layer in layers if metadata.of(layer.param, BlockSparsity)]
    dense = Counter(dense_reason(layer) for layer in layers if layer not in pruned)
    row: dict[str, Any] = {
        "ok": True,
        "eligible": len(layers),
        "pruned": len(pruned),
        "by_kind": dict(Counter(_kind(layer) for layer in pruned)),
        "dense": dict(dense),
        "warnings": sorted({str(w.message).splitlines()[0][:200] for w in caught}),
    }
    try:
        row["lowered"] = len(plan_graph(gm).layers)
    except LoweringError as exc:
        row["lowered"], row["lowering_error"] = 0, str(exc).splitlines()[0][:300]
    return row


def _kind(layer: WeightLayer) -> str:
    if layer.kind == "conv":
        return "conv" if layer.groups == 1 else "grouped conv"
    return "matmul" if layer.node.target != torch.ops.aten.linear.default else "linear"


def run_one(name: str, reorder: str, time_limit: int) -> dict[str, Any]:
    signal.signal(signal.SIGALRM, channel_coverage._alarm)
    signal.alarm(time_limit)
    start = time.perf_counter()
    try:
        result = measure(name, reorder)
    except channel_coverage.TimeLimit:
        result = {"ok": False, "error": "TimeLimit", "message": f"did not finish within {time_limit} s"}
    except Exception as exc:
        result = channel_coverage.error_row(exc)
    finally:
        signal.alarm(0)
    return {"model": name, "reorder": reorder, **result, "seconds": round(time.perf_counter() - start, 1)}


def summary(rows: list[dict[str, Any]]) -> str:
    done = [r for r in rows if r.get("ok")]
    lines = [
        f"{len(done)} of {len(rows)} models block-pruned and verified; "
        f"{sum(r['pruned'] for r in done)} of {sum(r['eligible'] for r in done)} eligible weights block-sparse; "
        f"{sum(r['lowered'] for r in done)} layers planned for kernels.",
        "",
        "| model | pruned / eligible | lowered | left dense (reason: count) / error |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r['model']} | - | - | **{r.get('error')}**: {r.get('message', '')[:160]} |")
            continue
        dense = "; ".join(f"{k}: {v}" for k, v in r["dense"].items())
        lowering = f" (plan: {r['lowering_error'][:120]})" if "lowering_error" in r else ""
        lines.append(
            f"| {r['model']} | {r['pruned']} / {r['eligible']} | {r['lowered']}{lowering} | {dense} |"
        )
    reasons: Counter[str] = Counter()
    for r in done:
        reasons.update(r["dense"])
    errors = Counter(r.get("error") for r in rows if not r.get("ok"))
    lines += [
        "",
        "Weights left dense, by reason: " + (", ".join(f"{k}: {v}" for k, v in reasons.items()) or "none"),
    ]
    lines += ["Failed models, by error: " + (", ".join(f"{k}: {v}" for k, v in errors.items()) or "none")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--models", nargs="*", help="these models only")
    parser.add_argument("--shard", default="1/1", help="k/n: the k-th of n slices of the model list")
    parser.add_argument(
        "--out", default="block_coverage.jsonl", help="JSON lines, appended; done models skipped"
    )
    parser.add_argument("--summary", action="store_true", help="only print the summary of --out")
    parser.add_argument("--reorder", default="tetris", choices=["none", "tetris"])
    parser.add_argument("--time-limit", type=int, default=600, help="seconds per model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    out = Path(args.out)
    lines = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    names = args.models or (list(QUICK) if args.quick else all_models())
    if not args.summary:
        k, n = (int(v) for v in args.shard.split("/"))
        done = {(r["model"], r["reorder"]) for r in lines}
        for name in [m for i, m in enumerate(names) if i % n == k - 1]:
            if (name, args.reorder) in done:
                continue
            row = run_one(name, args.reorder, args.time_limit)
            lines.append(row)
            with out.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
            print(f"{name}: {row['seconds']} s", file=sys.stderr, flush=True)
    latest = {r["model"]: r for r in lines if r["reorder"] == args.reorder}
    print(summary([latest[name] for name in names if name in latest]))


if __name__ == "__main__":
    main()
