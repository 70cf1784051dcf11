"""TETRIS compile time: wall time of the reorder pass and of the whole ``optimize``, plus what it keeps.

For each model it runs ``tilefx.optimize(model, inputs, Recipe(blocks=BlockPruning(block=(16, 1),
sparsity=0.8)))`` (``reorder="tetris"``, preset ``--preset``, ``"fast"`` by default; every pass
verified, as a user runs it) and prints

- ``tetris``: the planner alone (the TETRIS search: building the joint problem, EM, the identity
  check), timed around ``TetrisPlanner.__call__``;
- ``reorder``: ``ReorderDimsPass`` as ``TimingInstrument`` sees it (channel groups, TETRIS,
  folding the orders, and that pass's verification);
- ``optimize``: the whole call (capture, every pass and its verification), wall time and the
  process's CPU time (all threads; on a shared machine it is less noisy than wall time);
- ``kept``: the kept-L1 fraction, Σ|W| left in the block-pruned weights over Σ|W| of those weights
  in the dense model (TETRIS's objective after pruning; reordering never changes Σ|W|);
- ``digest``: a hash of every ``Permutation`` and ``BlockSparsity`` record, so two runs (or two
  versions of the code) can be compared for identical orders and masks.

Models: ``bert-base`` is ``transformers.BertModel(BertConfig())`` (12 layers, 768 wide, **random
init**, seed 0: timing does not depend on the weights' values, though the EM's iteration count
does somewhat); ``minilm`` is all-MiniLM-L6-v2 with its real weights (``tilefx.zoo.load_minilm``,
the demo's model). Inputs: batch 1 × sequence 128 (token ids and attention mask).

    .venv/bin/python benchmarks/tetris_time.py                      # both models
    .venv/bin/python benchmarks/tetris_time.py --models minilm --preset faithful
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import tilefx
from tilefx.passes.analysis.tetris_planner import TetrisPlanner
from tilefx.passes.infra import TimingInstrument
from tilefx.passes.metadata import BlockSparsity, Permutation, get_metadata
from tilefx.passes.reorder_dims import ReorderDimsPass
from tilefx.pipeline import default_pipeline

BLOCK = (16, 1)
SPARSITY = 0.8
SEQUENCE = 128


def bert_base() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    import transformers

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, SEQUENCE), generator=torch.Generator().manual_seed(0))
    return model, (ids, torch.ones_like(ids))


def minilm() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    from tilefx.zoo import SENTENCES, load_minilm

    loaded = load_minilm()
    return loaded.model, loaded.batches(SENTENCES[:1], size=1, length=SEQUENCE)[0]


MODELS = {"bert-base": bert_base, "minilm": minilm}


class _Timed:
    """A planner that records how long each call of the one it wraps takes."""

    def __init__(self, planner: TetrisPlanner) -> None:
        self.planner, self.seconds = planner, 0.0

    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.planner(*args)
        finally:
            self.seconds += time.perf_counter() - start


def measure(name: str, preset: str) -> dict[str, Any]:
    model, inputs = MODELS[name]()
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=BLOCK, sparsity=SPARSITY, tetris=preset))  # type: ignore[arg-type]
    passes = default_pipeline(recipe)
    timed: list[_Timed] = []
    for i, pass_ in enumerate(passes):
        if isinstance(pass_, ReorderDimsPass) and isinstance(pass_.planner, TetrisPlanner):
            timed.append(_Timed(pass_.planner))
            passes[i] = dataclasses.replace(pass_, planner=timed[-1])
    timing = TimingInstrument()
    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    pruned = tilefx.optimize(model, inputs, recipe=recipe, passes=passes, instruments=[timing])
    total, cpu = time.perf_counter() - start, time.process_time() - cpu
    reorder = sum(t.seconds for t in timing.timings if t.name == "ReorderDimsPass")
    return {
        "model": name,
        "preset": preset,
        "tetris_s": sum(t.seconds for t in timed),
        "reorder_s": reorder,
        "optimize_s": total,
        "optimize_cpu_s": cpu,
        "kept": kept_fraction(model, pruned),
        "digest": digest(pruned),
        "load": (load, os.getloadavg()[0]),
    }


def kept_fraction(model: torch.nn.Module, pruned: torch.fx.GraphModule) -> float:
    """Σ|W| kept in the block-pruned weights over Σ|W| of the same weights in the dense model."""
    dense = dict(model.named_parameters())
    kept = total = 0.0
    for target, records in get_metadata(pruned).params.items():
        if any(isinstance(r, BlockSparsity) for r in records):
            kept += float(pruned.get_parameter(target).detach().double().abs().sum())
            total += float(dense[target].detach().double().abs().sum())
    return kept / total


def digest(pruned: torch.fx.GraphModule) -> str:
    """sha256 over every parameter's Permutation orders and BlockSparsity masks, by name."""
    h = hashlib.sha256()
    for target, records in sorted(get_metadata(pruned).params.items()):
        for record in records:
            if isinstance(record, Permutation):
                h.update(f"{target}:perm{record.dim}:".encode() + np.asarray(record.order).tobytes())
            elif isinstance(record, BlockSparsity):
                h.update(f"{target}:block{record.block}:".encode() + record.mask.bool().numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["bert-base", "minilm"])
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    print(
        f"tilefx from {os.path.dirname(tilefx.__file__)}; torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores visible"
    )
    for _ in range(args.repeat):
        for name in args.models:
            r = measure(name, args.preset)
            print(
                f"{r['model']:9s} {r['preset']:8s} tetris {r['tetris_s']:7.1f} s  reorder pass {r['reorder_s']:7.1f} s  "
                f"optimize {r['optimize_s']:7.1f} s (cpu {r['optimize_cpu_s']:.1f} s)  kept L1 {r['kept']:.6f}  digest {r['digest']}  "
                f"load {r['load'][0]:.2f} -> {r['load'][1]:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
