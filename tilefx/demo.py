"""`make demo`: the main job end to end on real models, printing what each stage did.

1. all-MiniLM-L6-v2 with its real pretrained weights (the bundled real model): TETRIS-reordered
   block pruning of every linear layer, each layer refit by least squares to the dense one on
   calibration text, then distilled from the dense model on offline English text (a short budget),
   verified; lowered to TVM block-sparse kernels called from torch,
   verified again; held-out sentence-embedding quality and latency against the dense model.
2. torchvision ResNet-18: TETRIS + block pruning of every conv, lowered to TVM block-sparse conv
   kernels where they measure faster, verified, latency against dense torch.
3. torchvision ResNet-50 (architecture as shipped; weights random since none ship offline, with
   batch-norm statistics randomised so folding has real work): BN folding, then 50% channel
   pruning, per-pass timings, verification, size and eager latency before/after.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import torch
import torchvision

import tilefx
from tilefx.corpus import english_sentences
from tilefx.passes.infra import TimingInstrument
from tilefx.passes.metadata import BlockSparsity, get_metadata
from tilefx.report import (
    count_parameters,
    embedding_quality,
    max_relative_error,
    pass_table,
)
from tilefx.timing import interleaved_timings
from tilefx.zoo import load_minilm

__all__ = ["main"]

# Recovery budget of the demo (a few minutes on 2 cores); benchmarks/recovery.py runs the full one.
DEMO_STEPS = 600
FULL_STEPS = 2200  # ~14.5 minutes of recovery on 2 quiet cores (0.33 s a step after ~70 s of reconstruction)
RECONSTRUCT_BATCHES = 32


def minilm_recovery(steps: int) -> tilefx.Recovery:
    """What measured best on MiniLM (docs/recovery.md): prune every layer at once and refit what it
    keeps by least squares on 32 calibration batches (layer-wise reconstruction), then distil the
    residual stream (every layer norm's output) and the mean-pooled sentence embedding, padding left
    out of the loss (the attention mask is input 1), lr 1e-3 decaying linearly to 0."""
    return tilefx.Recovery(
        steps=steps,
        lr=1e-3,
        schedule="oneshot",
        reconstruct=RECONSTRUCT_BATCHES,
        warmup=0.0,
        decay="linear",
        output_loss="pooled",
        hidden_taps="norms",
        token_mask=1,
    )


def _randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if (
                isinstance(m, torch.nn.BatchNorm2d)
                and m.running_mean is not None
                and m.running_var is not None
            ):
                m.running_mean.copy_(torch.rand(m.num_features, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)


def _section(title: str) -> None:
    print(f"\n## {title}\n", flush=True)


def resnet50_demo() -> None:

    _section(
        "ResNet-50 (torchvision architecture, random weights: speed only): fold BN, prune 50% of channels"
    )
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    _randomize_batchnorm(model)
    x = torch.randn(1, 3, 224, 224)
    timing = TimingInstrument()
    start = time.perf_counter()
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5))
    optimized = tilefx.optimize(model, (x,), recipe=recipe, instruments=[timing])
    print(
        f"optimize: {time.perf_counter() - start:.1f} s (capture + passes + verification after each pass)\n"
    )
    print(pass_table(timing.timings))
    print("\nverified: BN folding exact against the model; channel pruning equal to the model with the")
    print("removed channels zeroed (both checked by the verification instrument after each pass)")
    print(f"parameters: {count_parameters(model):,} -> {count_parameters(optimized):,}")
    times = _medians({"dense": lambda: model(x), "ours": lambda: optimized(x)})
    dense, ours = times["dense"], times["ours"]
    print(f"eager latency (median of 20 interleaved): {dense:.1f} ms -> {ours:.1f} ms ({dense / ours:.2f}x)")


def minilm_demo(block: tuple[int, int] = (16, 1), sparsity: float = 0.8, steps: int = DEMO_STEPS) -> None:
    _section(
        f"all-MiniLM-L6-v2 (real weights): TETRIS + {block[0]}x{block[1]} blocks at {sparsity:.0%}, "
        f"reconstructed and distilled, -> TVM kernels"
    )
    minilm = load_minilm()
    training, held_out = english_sentences()
    train = [(x, None) for x in minilm.batches(training)[:-1]]  # unlabeled: learn from the dense model
    held = minilm.batches(held_out)
    inputs = held[0]
    print(
        f"text: {len(training)} training sentences from Python's documentation and docstrings (offline), "
        f"{len(held_out)} held-out ones never trained on"
    )
    blocks = tilefx.BlockPruning(block=block, sparsity=sparsity)
    start = time.perf_counter()
    oneshot = tilefx.optimize(minilm.model, inputs, tilefx.Recipe(blocks=blocks))
    print(f"one-shot magnitude pruning (no data, no training): {time.perf_counter() - start:.1f} s")
    recipe = tilefx.Recipe(blocks=blocks, recovery=minilm_recovery(steps))
    timing = TimingInstrument()
    start = time.perf_counter()
    pruned = tilefx.optimize(minilm.model, inputs, recipe=recipe, instruments=[timing], calibration=train)
    print(
        f"optimize with recovery ({steps} steps): {time.perf_counter() - start:.1f} s\n\n{pass_table(timing.timings)}\n"
    )
    sparse = [
        n
        for n, records in get_metadata(pruned).params.items()
        if any(isinstance(r, BlockSparsity) for r in records)
    ]
    print(
        f"{len(sparse)} linear weights block-sparse; every pass verified (reordering exact, the recovered "
        "model equal to itself with its recorded blocks zeroed)"
    )
    start = time.perf_counter()
    compiled = tilefx.compile(pruned, target="llvm")
    print(f"compile: {time.perf_counter() - start:.1f} s for the llvm target")
    from tilefx.lowering.build import lowering_choices  # tvm is imported only once compiling

    for choice in lowering_choices(compiled):
        print(f"  {choice.describe()}")
    with torch.no_grad():
        error = max_relative_error(
            compiled(*inputs)["last_hidden_state"], pruned(*inputs)["last_hidden_state"]
        )
    print(f"verified: compiled vs pruned torch model, max relative error {error:.2e}")
    count = len(held_out)
    dense = minilm.embed(minilm.model, held, count)
    before = embedding_quality(dense, minilm.embed(oneshot, held, count))
    after = embedding_quality(dense, minilm.embed(compiled, held, count))
    times = _medians({"dense": lambda: minilm.model(*inputs), "compiled": lambda: compiled(*inputs)})
    dense_ms, compiled_ms = times["dense"], times["compiled"]
    print(
        f"quality on {count} held-out sentences (vs dense): one-shot cosine {before[0]:.3f}, nearest-neighbour "
        f"agreement {before[1]:.0%}; recovered cosine {after[0]:.3f}, agreement {after[1]:.0%}"
    )
    print(
        f"speed (median of 20 interleaved, one batch of {inputs[0].shape[0]}x{inputs[0].shape[1]} tokens): dense torch "
        f"{dense_ms:.1f} ms, tilefx compiled {compiled_ms:.1f} ms ({dense_ms / compiled_ms:.2f}x vs dense)"
    )
    print(
        f"=> {block[0]}x{block[1]} blocks at {sparsity:.0%} after {steps} recovery steps: "
        f"{dense_ms / compiled_ms:.2f}x faster than dense torch with held-out cosine {after[0]:.3f} and "
        f"nearest-neighbour agreement {after[1]:.0%}"
    )
    print(
        f"this demo recovers for a short budget ({steps} steps); for the full one ({FULL_STEPS} steps, about 15 "
        "minutes on 2 cores) run\n"
        f"  .venv/bin/python benchmarks/recovery.py --blocks {block[0]}x{block[1]} --sparsities {sparsity} "
        f"--reorders tetris --steps {FULL_STEPS} --lr 1e-3 --warmup 0 --decay linear --schedule oneshot "
        f"--reconstruct {RECONSTRUCT_BATCHES}"
    )


def resnet18_blocks_demo(block: tuple[int, int] = (16, 1), sparsity: float = 0.8) -> None:
    from tilefx.lowering.build import lowering_choices  # imports tvm

    _section(
        f"ResNet-18 (torchvision architecture, random weights: speed only): TETRIS + {block[0]}x{block[1]} "
        f"blocks at {sparsity:.0%} -> TVM conv kernels"
    )
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=block, sparsity=sparsity))
    pruned = tilefx.optimize(model, (x,), recipe=recipe)
    print(f"optimize: {time.perf_counter() - start:.1f} s (every pass verified)")
    start = time.perf_counter()
    compiled = tilefx.compile(pruned, target="llvm")
    choices = lowering_choices(compiled)
    print(
        f"compile: {time.perf_counter() - start:.1f} s; {sum(c.lowered for c in choices)} of {len(choices)} "
        "block-sparse layers run TVM kernels, the rest measured slower and kept dense"
    )
    with torch.no_grad():
        error = max_relative_error(compiled(x), pruned(x))
    print(f"verified: compiled vs pruned torch model, max relative error {error:.2e}")
    times = _medians(
        {"dense": lambda: model(x), "pruned": lambda: pruned(x), "compiled": lambda: compiled(x)}
    )
    dense_ms, pruned_ms, compiled_ms = times["dense"], times["pruned"], times["compiled"]
    print(
        f"latency (median of 20 interleaved, batch 1, 224x224): dense torch {dense_ms:.1f} ms, pruned torch {pruned_ms:.1f} ms, "
        f"tilefx compiled {compiled_ms:.1f} ms ({dense_ms / compiled_ms:.2f}x vs dense)"
    )


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    from tilefx.lowering import openmp_launch  # imports tvm

    shared, why = openmp_launch.available()
    print(
        f"tilefx {tilefx.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        + (
            "TVM kernels run on torch's OpenMP threads"
            if shared
            else f"TVM kernels use their own pool ({why})"
        )
    )
    minilm_demo()
    resnet18_blocks_demo()
    resnet50_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _medians(calls: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median ms of 20 interleaved rounds each (``tilefx.timing``)."""
    return {name: t.median for name, t in interleaved_timings(calls, rounds=20, warmup=3).items()}
