"""Latency of channel-pruned models in torch eager: dense vs tilefx-pruned (and Torch-Pruning).

resnet50, mobilenet_v2 and vit_b_16 (random weights; latency does not depend on their values)
at 50% of channels, L1, batch 1, 224×224. Columns: the dense nn.Module; tilefx's dense graph
(captured + BN folded, no pruning: isolates what capture/folding alone changes); tilefx pruned;
Torch-Pruning pruned (same ratio, MetaPruner + L1). Medians of ``--runs`` runs after warm-up, in
one process, the variants timed in rotation; ratios are dense / pruned (> 1 = faster).

    OMP_NUM_THREADS=1 python benchmarks/channel_latency.py [--runs 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision

from tilefx.timing import interleaved_timings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import count_macs, machine  # noqa: E402
from channel_coverage import attention_heads, classifier_layers  # noqa: E402

import tilefx  # noqa: E402

MODELS = ("resnet50", "mobilenet_v2", "vit_b_16")


def torch_pruning_pruned(name: str, x: torch.Tensor, ratio: float) -> torch.nn.Module | None:
    import torch_pruning as tp

    model = torchvision.models.get_model(name, weights=None).eval()
    with torch.no_grad():
        reference = model(x)
    try:
        tp.pruner.MetaPruner(
            model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
            ignored_layers=classifier_layers(model, reference), num_heads=attention_heads(model),
        ).step()  # fmt: skip
    except Exception as exc:
        logging.getLogger("channel_latency").warning("Torch-Pruning failed on %s: %s", name, exc)
        return None
    return model


def row(name: str, ratio: float, runs: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    folded = tilefx.optimize(model, (x,))
    pruned = tilefx.optimize(model, (x,), recipe=tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=ratio)))
    peer = torch_pruning_pruned(name, x, ratio)
    fns: dict[str, Callable[[], Any]] = {
        "dense": lambda: model(x),
        "folded": lambda: folded(x),
        "pruned": lambda: pruned(x),
    }
    if peer is not None:
        fns["tp"] = lambda: peer(x)
    result: dict[str, Any] = {
        "model": name,
        "tp": None,
        **{k: t.median for k, t in interleaved_timings(fns, rounds=runs, warmup=3).items()},
    }
    result["macs"] = (count_macs(model, (x,)), count_macs(pruned, (x,)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"{machine()}; batch 1, 224×224, ratio {args.ratio:.0%}, median of {args.runs} runs\n")
    print(
        "| model | dense ms | tilefx dense (folded) ms | tilefx pruned ms | speed-up | Torch-Pruning ms | TP speed-up | MACs dense → pruned |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r = row(name, args.ratio, args.runs)
        tp_cells = f"{r['tp']:.1f} | {r['dense'] / r['tp']:.2f}×" if r["tp"] else "failed | –"
        print(
            f"| {name} | {r['dense']:.1f} | {r['folded']:.1f} | {r['pruned']:.1f} | {r['dense'] / r['pruned']:.2f}× "
            f"| {tp_cells} | {r['macs'][0] / 1e9:.2f} G → {r['macs'][1] / 1e9:.2f} G |",
            flush=True,
        )


if __name__ == "__main__":
    main()
