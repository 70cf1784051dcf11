"""Channel-pruning coverage: every torchvision classifier and BERT/ViT/GPT-2, tilefx vs Torch-Pruning.

For each model and ratio (30%, 50% of channels, L1 magnitude) both tools prune in the same
process. tilefx: ``tilefx.optimize`` with ``ChannelPruning`` (verification on: the shrunk graph
must equal the input with the pruned channels zeroed, and shapes must agree, or the pass
fails with a typed error); a pass also needs the output shape unchanged and finite outputs.
Torch-Pruning 1.6.1: ``MetaPruner`` with ``MagnitudeImportance(p=1)``, the classifier in
``ignored_layers`` and, where the model has attention, ``num_heads`` as its docs ask; a pass
needs the pruned model to run with the output shape unchanged (it has no equivalence check).
Also: MACs and params before/after, and the time each tool takes to build its dependency graph
(tilefx: capture + the channel-groups analysis; Torch-Pruning: ``DependencyGraph.build_dependency``).

Each tool gets ``--time-limit`` seconds per model (both ratios); past it, both ratios count as
failed with ``TimeLimit``. Results go to a JSON-lines file (one line per model, so a sweep can be split into shards that
each stay under the machine's time limit), and a summary is printed from all lines present.

    OMP_NUM_THREADS=1 python benchmarks/channel_coverage.py --quick
    OMP_NUM_THREADS=1 python benchmarks/channel_coverage.py --shard 1/4 --out /tmp/cov.jsonl  # ... 4/4
    python benchmarks/channel_coverage.py --summary --out /tmp/cov.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import count_macs, count_params, machine  # noqa: E402

import tilefx  # noqa: E402

RATIOS = (0.3, 0.5)
QUICK = ("resnet18", "mobilenet_v2", "densenet121", "squeezenet1_0", "vit_b_16", "bert", "gpt2")
NEEDS_224 = ("vit_", "swin_", "maxvit_")


# ---- models -------------------------------------------------------------------------------
def torchvision_model(name: str) -> tuple[nn.Module, tuple[Any, ...]]:
    side = 224 if name.startswith(NEEDS_224) else 96 if name == "inception_v3" else 64
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval(), (torch.randn(1, 3, side, side),)


def bert() -> tuple[nn.Module, tuple[Any, ...]]:
    """With a classification head: the hidden width is then internal, prunable by both tools."""
    import transformers

    config = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (1, 12))
    return transformers.BertForSequenceClassification(config).eval(), (ids, torch.ones_like(ids))


def vit_hf() -> tuple[nn.Module, tuple[Any, ...]]:
    import transformers

    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128, num_labels=10)  # fmt: skip
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config).eval(), (torch.randn(1, 3, 32, 32),)


def gpt2() -> tuple[nn.Module, tuple[Any, ...]]:
    import transformers

    config = transformers.GPT2Config(vocab_size=500, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval(), (torch.randint(0, 500, (1, 12)),)


TRANSFORMERS: dict[str, Callable[[], tuple[nn.Module, tuple[Any, ...]]]] = {
    "bert": bert, "vit_hf": vit_hf, "gpt2": gpt2,
}  # fmt: skip


def all_models() -> list[str]:
    return list(torchvision.models.list_models(module=torchvision.models)) + list(TRANSFORMERS)


def build(name: str) -> tuple[nn.Module, tuple[Any, ...]]:
    return TRANSFORMERS[name]() if name in TRANSFORMERS else torchvision_model(name)


def first_output(out: Any) -> torch.Tensor:
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return leaves[0]


def output_ok(model: nn.Module, inputs: tuple[Any, ...], reference: torch.Tensor) -> str | None:
    """None when the model runs with the reference's output shape and finite values, else why not."""
    with torch.no_grad():
        out = first_output(model(*inputs))
    if out.shape != reference.shape:
        return f"output shape {tuple(out.shape)} != {tuple(reference.shape)}"
    if not bool(torch.isfinite(out).all()):
        return "non-finite output"
    return None


def error_row(exc: BaseException) -> dict[str, Any]:
    message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return {"ok": False, "error": type(exc).__name__, "message": message}


# ---- tilefx --------------------------------------------------------------------------------
def run_tilefx(model: nn.Module, inputs: tuple[Any, ...], reference: torch.Tensor) -> dict[str, Any]:
    """Capture once (timed with the channel-groups analysis: tilefx's dependency graph), then
    optimize the captured graph densely (BN folded: the params baseline) and at each ratio."""
    from tilefx.graph_capture import capture
    from tilefx.passes.analysis.channel_groups import ChannelGroupsAnalysis
    from tilefx.passes.infra.analysis_manager import AnalysisManager

    row: dict[str, Any] = {}
    try:
        start = time.perf_counter()
        gm = capture(model, inputs)
        row["capture_seconds"] = time.perf_counter() - start
        row["params_dense"] = count_params(tilefx.optimize(gm, inputs))
    except Exception as exc:  # a capture failure fails every ratio the same way
        return {"dense": error_row(exc)}
    try:
        start = time.perf_counter()
        AnalysisManager(gm, inputs).get(ChannelGroupsAnalysis())
        row["graph_seconds"] = row["capture_seconds"] + time.perf_counter() - start
    except Exception as exc:
        row["graph_seconds"] = None
        row["graph_error"] = error_row(exc)
    row["tp_graph_seconds"] = torch_pruning_graph_seconds(model, inputs)
    for ratio in RATIOS:
        start = time.perf_counter()
        try:
            recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=ratio, criterion="l1"))
            pruned = tilefx.optimize(gm, inputs, recipe=recipe)
            problem = output_ok(pruned, inputs, reference)
            if problem:
                row[str(ratio)] = {"ok": False, "error": "OutputMismatch", "message": problem}
                continue
            row[str(ratio)] = {"ok": True, "params": count_params(pruned), "macs": count_macs(pruned, inputs),
                               "seconds": time.perf_counter() - start}  # fmt: skip
        except Exception as exc:
            row[str(ratio)] = error_row(exc)
    return row


# ---- Torch-Pruning -------------------------------------------------------------------------
def classifier_layers(model: nn.Module, reference: torch.Tensor) -> list[nn.Module]:
    """Layers whose outputs are the model's outputs: Linear / Conv with out = the output width."""
    width = reference.shape[-1] if reference.dim() == 2 else reference.shape[1]
    found = []
    for module in model.modules():
        out = getattr(module, "out_features", None) or getattr(module, "out_channels", None)
        if isinstance(module, (nn.Linear, nn.Conv2d)) and out == width:
            found.append(module)
    if hasattr(model, "lm_head"):
        found.append(model.lm_head)
    return found


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    heads: dict[nn.Module, int] = {}
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            heads[module] = module.num_heads
        found = hf_projections(module)
        if found is not None:
            heads.update({projection: found[0] for projection in found[1]})
    return heads


PROJECTIONS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))


def hf_projections(module: nn.Module) -> tuple[int, list[nn.Module]] | None:
    """(heads, [q, k, v]) of a transformers self-attention module, or None."""
    n = getattr(module, "num_attention_heads", None)
    for names in PROJECTIONS:
        if n and all(isinstance(getattr(module, a, None), nn.Linear) for a in names):
            return int(n), [getattr(module, a) for a in names]
    return None


def fix_hf_attention(model: nn.Module) -> None:
    """Torch-Pruning's documented follow-up for transformers attention: resize the head bookkeeping."""
    for module in model.modules():
        found = hf_projections(module)
        if found is None:
            continue
        n, (query, _, _) = found
        for attribute in ("attention_head_size", "head_dim"):
            if hasattr(module, attribute):
                setattr(module, attribute, query.out_features // n)
        if hasattr(module, "all_head_size"):
            module.all_head_size = query.out_features


def torch_pruning_graph_seconds(model: nn.Module, inputs: tuple[Any, ...]) -> float | None:
    """Seconds for Torch-Pruning to build its dependency graph (None if it cannot)."""
    import torch_pruning as tp

    example = inputs[0] if len(inputs) == 1 else inputs
    try:
        start = time.perf_counter()
        tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
        return time.perf_counter() - start
    except Exception:
        return None


def run_torch_pruning(name: str, reference: torch.Tensor) -> dict[str, Any]:
    import torch_pruning as tp

    model, inputs = build(name)
    example = inputs[0] if len(inputs) == 1 else inputs
    row: dict[str, Any] = {"graph_seconds": torch_pruning_graph_seconds(model, inputs)}
    for ratio in RATIOS:
        model, inputs = build(name)
        row["params_dense"] = count_params(model)
        try:
            pruner = tp.pruner.MetaPruner(
                model, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                ignored_layers=classifier_layers(model, reference), num_heads=attention_heads(model),
            )  # fmt: skip
            pruner.step()
            fix_hf_attention(model)
            problem = output_ok(model, inputs, reference)
            if problem:
                row[str(ratio)] = {"ok": False, "error": "OutputMismatch", "message": problem}
                continue
            row[str(ratio)] = {"ok": True, "params": count_params(model), "macs": count_macs(model, inputs)}
        except Exception as exc:
            row[str(ratio)] = error_row(exc)
    return row


# ---- driver --------------------------------------------------------------------------------
class TimeLimit(BaseException):
    """A tool ran past ``--time-limit`` on one model (a BaseException: no per-ratio handler eats it)."""


def _alarm(signum: int, frame: Any) -> None:
    raise TimeLimit("did not finish within the time limit")


def measure(name: str, tool: str, time_limit: int) -> dict[str, Any]:
    """One JSON line: the model's dense numbers and one tool's results (both ratios)."""
    model, inputs = build(name)
    with torch.no_grad():
        reference = first_output(model(*inputs))
    row: dict[str, Any] = {"model": name, "tool": tool, "input": [tuple(t.shape) for t in inputs],
                           "macs_dense": count_macs(model, inputs), "params_dense": count_params(model)}  # fmt: skip
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(time_limit)
    try:
        row["result"] = (
            run_tilefx(model, inputs, reference) if tool == "tilefx" else run_torch_pruning(name, reference)
        )
    except TimeLimit as exc:
        failed = error_row(exc) | {"message": f"did not finish within {time_limit} s"}
        row["result"] = {str(ratio): failed for ratio in RATIOS}
    except Exception as exc:
        row["result"] = {"dense": error_row(exc)}
    finally:
        signal.alarm(0)
    row["seconds"] = time.perf_counter() - start
    return row


def load(out: Path) -> list[dict[str, Any]]:
    """Per model: dense numbers plus {tool: result}; the last line for a (model, tool) wins."""
    merged: dict[str, dict[str, Any]] = {}
    lines = out.read_text().splitlines() if out.exists() else []
    for line in map(json.loads, lines):
        row = merged.setdefault(line["model"], {"tilefx": {}, "tp": {}})
        row.update({k: v for k, v in line.items() if k not in ("tool", "result", "seconds")})
        row.setdefault("threads", 1 if "result" in line else "?")  # every sweep so far ran OMP_NUM_THREADS=1
        if "tool" in line:
            row[line["tool"]] = line.get("result", {})
    return list(merged.values())


def ok(tool: dict[str, Any], ratio: float) -> bool:
    return bool(tool.get(str(ratio), {}).get("ok"))


def reduction(row: dict[str, Any], tool: str, ratio: float, key: str) -> float:
    dense = row["macs_dense"] if key == "macs" else row[tool].get("params_dense", row["params_dense"])
    return 1 - row[tool][str(ratio)][key] / dense


def median(values: list[float]) -> str:
    return f"{statistics.median(values):.3g}" if values else "–"


def summary(rows: list[dict[str, Any]]) -> str:
    """Pass counts over the models each tool was run on; reductions over models both passed."""
    ran = {tool: [r for r in rows if r[tool]] for tool in ("tilefx", "tp")}
    lines = [f"{len(rows)} models; {machine().split(', torch ')[0]} (summary machine; threads used: see below)", "",
             "| ratio | tilefx pass | Torch-Pruning pass | both | median MACs red. tilefx / TP | median params red. tilefx / TP |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for ratio in RATIOS:
        both = [r for r in rows if ok(r["tilefx"], ratio) and ok(r["tp"], ratio)]
        noop = sum(ok(r["tp"], ratio) and reduction(r, "tp", ratio, "macs") < 0.01 for r in rows)
        lines.append(
            f"| {ratio:.0%} | {sum(ok(r['tilefx'], ratio) for r in rows)}/{len(ran['tilefx'])} "
            f"| {sum(ok(r['tp'], ratio) for r in rows)}/{len(ran['tp'])} ({noop} removed < 1% MACs) | {len(both)} "
            f"| {median([reduction(r, 'tilefx', ratio, 'macs') for r in both])} / {median([reduction(r, 'tp', ratio, 'macs') for r in both])} "
            f"| {median([reduction(r, 'tilefx', ratio, 'params') for r in both])} / {median([reduction(r, 'tp', ratio, 'params') for r in both])} |"
        )
    # both times from the tilefx run (same process, same moment); else TP's own line
    graph_times = [
        (
            r["tilefx"].get("graph_seconds"),
            r["tilefx"].get("tp_graph_seconds") or r["tp"].get("graph_seconds"),
        )
        for r in rows
    ]
    paired = [(a, b) for a, b in graph_times if a is not None and b is not None]
    analysis_only = [
        r["tilefx"]["graph_seconds"] - r["tilefx"]["capture_seconds"]
        for r in rows
        if r["tilefx"].get("graph_seconds") is not None and "capture_seconds" in r["tilefx"]
    ]
    threads = sorted({r.get("threads", "?") for r in rows}, key=str)
    lines += ["", f"dependency graph build, median over {len(paired)} models: tilefx (capture + channel groups) "
              f"{median([a for a, _ in paired])} s, of which the channel-groups analysis alone "
              f"{median(analysis_only)} s; Torch-Pruning {median([b for _, b in paired])} s. "
              f"Torch threads during the measurements: {threads}"]  # fmt: skip
    lines += ["", "| model | tilefx 30% | tilefx 50% | TP 30% | TP 50% | MACs red. 50% tilefx / TP | graph s tilefx / TP |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        cells = [cell(r[tool], ratio) for tool in ("tilefx", "tp") for ratio in RATIOS]
        red = " / ".join(
            f"{reduction(r, t, 0.5, 'macs'):.2f}" if ok(r[t], 0.5) else "–" for t in ("tilefx", "tp")
        )
        times = " / ".join(_seconds(r[t].get("graph_seconds")) for t in ("tilefx", "tp"))
        lines.append(f"| {r['model']} | {' | '.join(cells)} | {red} | {times} |")
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def cell(tool: dict[str, Any], ratio: float) -> str:
    if not tool:
        return "not run"
    result = tool.get(str(ratio)) or tool.get("dense") or {}
    if result.get("ok"):
        return "ok"
    return f"{result.get('error', '?')}: {result.get('message', '')[:90]}".replace("|", "/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--models", nargs="*", help="these models only")
    parser.add_argument("--shard", default="1/1", help="k/n: the k-th of n slices of the model list")
    parser.add_argument(
        "--out",
        default="channel_coverage.jsonl",
        help="JSON lines, appended; done (model, tool) pairs skipped",
    )
    parser.add_argument("--summary", action="store_true", help="only print the summary of --out")
    parser.add_argument("--time-limit", type=int, default=600, help="seconds per model and tool, both ratios")
    parser.add_argument("--tools", nargs="+", default=["tilefx", "tp"], choices=["tilefx", "tp"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    done = (
        {(r["model"], r.get("tool")) for r in map(json.loads, out.read_text().splitlines())}
        if out.exists()
        else set()
    )
    if not args.summary:
        names = args.models or (list(QUICK) if args.quick else all_models())
        k, n = (int(v) for v in args.shard.split("/"))
        for name in [m for i, m in enumerate(names) if i % n == k - 1]:
            for tool in args.tools:
                if (name, tool) in done:
                    continue
                start = time.perf_counter()
                try:
                    row = measure(name, tool, args.time_limit)
                except Exception as exc:  # the model itself failed to build or run: say so, go on
                    row = {"model": name, "tool": tool, "build_error": error_row(exc),
                           "trace": traceback.format_exc()[-500:]}  # fmt: skip
                with out.open("a") as f:
                    f.write(json.dumps(row, default=str) + "\n")
                print(f"{name} [{tool}]: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    wanted = set(args.models or (QUICK if args.quick else all_models()))
    rows = [r for r in load(out) if r["model"] in wanted and "build_error" not in r]
    print(summary(rows))


if __name__ == "__main__":
    main()
