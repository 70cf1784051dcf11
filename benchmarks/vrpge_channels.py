"""VR-PGE vs L1 channel pruning at equal MACs on real offline data (scikit-learn's digits).

One dense CNN (``channel_accuracy.DigitsCNN``: conv-bn-relu ×3, 32/64/64 channels) is trained on a
fixed split. For each target saving (30/50/70% of MACs removed):

- the channel ratio whose uniformly L1-pruned model has the target MACs sets VR-PGE's global
  budget: keep ``1 − ratio`` of the prunable units' linearised MACs (``budget="flops"``; with
  ``--budget channels``, of the channel count, which lets VR-PGE cut the costly layers harder);
- VR-PGE (``ChannelPruning(criterion="vrpge")`` through ``tilefx.optimize``) searches for ``--search``
  steps (weights and scores trained together from the dense weights), fixes its mask, and
  PruneChannelsPass shrinks the model; its realised MACs are what L1 must match;
- L1 (``ChannelPruning(criterion="l1")``, per layer) at the ratio whose MACs are nearest VR-PGE's;
- each pruned model gets the same fine-tune on the one training loop (``--finetune`` SGD steps);
  "L1, long" fine-tunes L1 for search + fine-tune steps, the same total training as VR-PGE.

The VR-PGE model at the middle target also goes through ``tilefx.compile`` (dense smaller layers
stay torch: nothing block-sparse to lower) and is checked against its torch form.

    OMP_NUM_THREADS=1 python benchmarks/vrpge_channels.py [--seeds 2] [--save]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import count_macs, count_params, save_result  # noqa: E402
from channel_accuracy import Shuffled, Split, accuracy, load_digits, train_dense  # noqa: E402

import tilefx  # noqa: E402
from tilefx.passes.training.calibration import Calibration  # noqa: E402
from tilefx.passes.training.loop import LoopOptions, train  # noqa: E402

log = logging.getLogger("vrpge_channels")

RESULT = Path(__file__).resolve().parent / "results" / "vrpge_channels.md"


def batches(split: Split, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(Shuffled(split.x_train, split.y_train, 64, seed))


def prune_l1(model: nn.Module, split: Split, ratio: float) -> torch.fx.GraphModule:
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=ratio, criterion="l1"))
    return tilefx.optimize(model, (split.x_test[:2],), recipe=recipe)


def l1_ratio_for(model: nn.Module, split: Split, macs: float) -> float:
    """The L1 channel ratio (a multiple of 0.01) whose pruned MACs are nearest ``macs``.

    MACs fall as the ratio grows, so a bisection over the percent grid finds the crossing.
    """
    x1 = (split.x_test[:1],)
    measured: dict[int, int] = {}

    def at(percent: int) -> int:
        if percent not in measured:
            measured[percent] = count_macs(prune_l1(model, split, percent / 100), x1)
        return measured[percent]

    low, high = 0, 95  # at(low) >= macs >= at(high), assumed
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if at(middle) >= macs else (low, middle)
    return min((low, high), key=lambda p: abs(at(p) - macs)) / 100


def prune_vrpge(model: nn.Module, split: Split, ratio: float, args: argparse.Namespace, seed: int) -> Any:
    options = tilefx.VRPGEOptions(
        steps=args.search, lr=args.lr, score_lr=args.score_lr, finetune_steps=0, seed=seed,
        estimator=args.estimator, budget=args.budget,
    )  # fmt: skip
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=ratio, criterion="vrpge", options=options))
    return tilefx.optimize(model, (split.x_test[:2],), recipe=recipe, calibration=batches(split, seed + 7))


def finetune(gm: torch.fx.GraphModule, split: Split, steps: int, lr: float, seed: int) -> None:
    """Plain SGD on the pruned (smaller, dense) model: the same loop and budget for every method."""
    for p in gm.parameters():
        p.requires_grad_(True)

    def objective(model: nn.Module, inputs: tuple[Any, ...], labels: Any) -> torch.Tensor:
        return F.cross_entropy(model(*inputs), labels)

    options = LoopOptions(steps=steps, lr=lr, optimizer="sgd", decay="cosine", seed=seed, progress=False)
    train(gm, objective, Calibration(batches(split, seed + 11)), options)


def check_compiled(gm: torch.fx.GraphModule, split: Split) -> str:
    """tilefx.compile the pruned model and compare it with its torch form on the test set."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nothing lowered": channel pruning needs no sparse kernel
        compiled = tilefx.compile(gm, target="llvm")
    with torch.no_grad():
        expected, got = gm(split.x_test), compiled(split.x_test)
    error = float((expected - got).abs().max())
    assert error <= 1e-5 * float(expected.abs().max()), error
    same = bool((expected.argmax(1) == got.argmax(1)).all())
    return f"tilefx.compile (llvm): max |compiled − torch| = {error:.2g}, same predictions: {same}"


def run(seed: int, split: Split, args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    model = train_dense(split, seed, args.train_epochs)
    x1 = (split.x_test[:1],)
    dense_macs = count_macs(model, x1)
    rows = [dict(seed=seed, target=0.0, method="dense", ratio=0.0, macs=dense_macs, params=count_params(model),
                 pruned=accuracy(model, split.x_test, split.y_test), tuned=float("nan"), seconds=0.0)]  # fmt: skip
    compiled_note = ""
    for target in args.targets:
        budget_ratio = l1_ratio_for(model, split, (1 - target) * dense_macs)
        start = time.perf_counter()
        searched = prune_vrpge(copy.deepcopy(model), split, budget_ratio, args, seed)
        seconds = time.perf_counter() - start
        macs = count_macs(searched, x1)
        if target == args.targets[len(args.targets) // 2] and not compiled_note:
            compiled_note = check_compiled(searched, split)
        l1_ratio = l1_ratio_for(model, split, macs)
        candidates = [("VR-PGE", searched, budget_ratio, args.finetune, seconds),
                      ("L1", prune_l1(model, split, l1_ratio), l1_ratio, args.finetune, 0.0),
                      ("L1, long", prune_l1(model, split, l1_ratio), l1_ratio, args.finetune + args.search, 0.0)]  # fmt: skip
        for method, pruned, ratio, steps, took in candidates:
            before = accuracy(pruned, split.x_test, split.y_test)
            finetune(pruned, split, steps, args.ft_lr, seed)
            rows.append(dict(seed=seed, target=target, method=method, ratio=ratio, macs=count_macs(pruned, x1),
                             params=count_params(pruned), pruned=before,
                             tuned=accuracy(pruned, split.x_test, split.y_test), seconds=took))  # fmt: skip
            log.warning("seed %d target %.2f %s: %s", seed, target, method, rows[-1])
    return rows, compiled_note


def table(rows: list[dict[str, Any]], dense_macs: int) -> str:
    lines = [
        "| target MACs removed | method | channel ratio | MACs (removed) | params | acc. right after pruning "
        "| acc. after fine-tune | search time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((r["target"], r["method"]) for r in rows)
    for target, method in keys:
        mine = [r for r in rows if r["target"] == target and r["method"] == method]

        def cell(key: str, mine: list[dict[str, Any]] = mine) -> str:
            values = [r[key] for r in mine]
            if len(values) == 1 or any(v != v for v in values):
                return f"{values[0]:.2f}"
            return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

        macs = statistics.mean(r["macs"] for r in mine)
        lines.append(
            f"| {target:.0%} | {method} | {cell('ratio')} | {macs:,.0f} ({1 - macs / dense_macs:.1%}) "
            f"| {statistics.mean(r['params'] for r in mine):,.0f} | {cell('pruned')} | {cell('tuned')} "
            f"| {cell('seconds')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2, help="training seeds (mean ± std reported)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--train-epochs", type=int, default=15)
    parser.add_argument("--search", type=int, default=400, help="VR-PGE search steps (batch 64)")
    parser.add_argument("--finetune", type=int, default=200, help="fine-tune steps for every method")
    parser.add_argument("--lr", type=float, default=0.01, help="VR-PGE weight lr (SGD) during the search")
    parser.add_argument("--score-lr", type=float, default=0.05, help="VR-PGE score lr (Adam)")
    parser.add_argument("--estimator", choices=["code", "score"], default="code")
    parser.add_argument("--budget", choices=["channels", "flops"], default="flops")
    parser.add_argument("--ft-lr", type=float, default=0.01, help="fine-tune SGD lr (cosine)")
    parser.add_argument("--save", action="store_true", help=f"write {RESULT.name} under benchmarks/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    start = time.perf_counter()
    split = load_digits(seed=0)
    rows, notes = [], []
    for seed in range(args.seeds):
        seed_rows, note = run(seed, split, args)
        rows += seed_rows
        notes.append(note)
    dense_macs = rows[0]["macs"]
    body = "\n".join([
        f"digits (sklearn bundled, {len(split.y_train)} train / {len(split.y_test)} test), {args.seeds} seed(s), "
        f"mean ± std over seeds. VR-PGE: {args.search} search steps (SGD lr {args.lr} on weights, Adam lr "
        f"{args.score_lr} on scores, K = 2, estimator {args.estimator!r}, budget {args.budget!r}: keep 1 − ratio of it globally, the ratio "
        f"being the uniform L1 ratio that meets the target), "
        f"final mask = best of 10 samples by training loss. Every pruned model: {args.finetune} SGD fine-tune "
        f"steps (batch 64, lr {args.ft_lr}, cosine) on the one loop; \"L1, long\": {args.finetune + args.search}.",
        "",
        table(rows, dense_macs),
        "",
        *sorted(set(notes)),
        f"\ntotal {time.perf_counter() - start:.0f} s, torch threads 1",
    ])  # fmt: skip
    print(body)
    if args.save:
        save_result(RESULT, "VR-PGE vs L1 channel pruning at equal MACs (digits)", body)


if __name__ == "__main__":
    main()
