"""`make demo`: the main job end to end on real models, printing what each stage did.

1. all-MiniLM-L6-v2 with its real pretrained weights (the bundled real model): int8 in the
   compiler (``Recipe(quantize=Quantization())``: per-token u8 activations, per-channel s8 weights,
   VNNI kernels) and ``Recipe(speedup=...)`` (the measured per-unit search over kept FFN neurons and
   heads, number formats and blocks), each compiled; beside them dense fp32 torch and torch's
   one-line dynamic int8, which is what a user would pick instead. Quality is the sentence
   embeddings' cosine to the dense model on three held-out sets — Python documentation (the
   calibration domain), everyday English and news (sources no calibration reads) — and speed is
   measured interleaved in the same process.
2. torchvision ResNet-50 (architecture as shipped; weights random since none ship offline, with
   batch-norm statistics randomised so folding has real work): BN folding, then 50% channel
   pruning, per-pass timings, verification, size and eager latency before/after.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch
import torchvision

import tilefx
from tilefx.corpus import calibration_sentences, english_sentences, out_of_domain_sentences
from tilefx.models import SentenceEmbedder
from tilefx.passes.infra import TimingInstrument
from tilefx.passes.search.space import SpeedSearch
from tilefx.report import count_parameters, embedding_quality, pass_table
from tilefx.speed_target import SearchReport
from tilefx.timing import Timing, interleaved_timings
from tilefx.zoo import load_minilm

__all__ = ["main"]

#: The speed-up the demo asks of ``Recipe(speedup=...)``, and the search space it may use: small
#: enough to search in about two minutes on 2 cores (benchmarks/frontier.py searches the default one).
SPEEDUP = 2.5
DEMO_SEARCH = SpeedSearch(keeps=(1.0, 0.75, 0.5), sparsities=(0.5,), calibration_batches=16, check_batches=4)


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every batch norm non-trivial statistics, so that folding them has real work (random
    weights: no pretrained ones ship offline)."""
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
    randomize_batchnorm(model)
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


def minilm_demo() -> None:
    _section(
        "all-MiniLM-L6-v2 (real weights): int8 in the compiler and Recipe(speedup=...), against dense fp32 "
        "torch and torch's dynamic int8"
    )
    minilm = load_minilm()
    dense = SentenceEmbedder(minilm.model).eval()
    search = DEMO_SEARCH
    text = calibration_sentences("mixed")[: 16 * (search.calibration_batches + search.check_batches)]
    calibration = [(batch, None) for batch in minilm.batches(text, 16, 32)]
    sets = {"in-domain (Python docs)": english_sentences()[1], **out_of_domain_sentences()}
    evaluation = {name: minilm.batches(sentences, 16, 32) for name, sentences in sets.items()}
    print(
        f"calibration: {len(text)} sentences, half Python's documentation, half general English "
        f"(Wikipedia); evaluation: {', '.join(f'{len(v)} {k}' for k, v in sets.items())}, none calibrated on"
    )
    models: dict[str, Callable[..., torch.Tensor]] = {
        "dense fp32 torch": dense,
        "torch dynamic int8": torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(dense), {torch.nn.Linear}, dtype=torch.qint8
        ),
    }
    for name, recipe in (
        ("tilefx int8", tilefx.Recipe(quantize=tilefx.Quantization())),
        (f"tilefx speedup={SPEEDUP:g}", tilefx.Recipe(speedup=SPEEDUP, search=search)),
    ):
        start = time.perf_counter()
        optimized = tilefx.optimize(dense, calibration[0][0], recipe, calibration=calibration)
        compiled = tilefx.compile(optimized)
        print(f"{name}: optimize + compile {time.perf_counter() - start:.0f} s")
        report = optimized.meta.get("speed_search")
        if report is not None:
            _describe_search(report)
        models[name] = compiled
    _quality_and_speed(models, evaluation)


def _describe_search(report: SearchReport) -> None:
    counts = Counter(report.chosen.values())
    summary = ", ".join(f"{n}× {option}" for option, n in counts.most_common())
    measured = ", ".join(f"{m:.2f}x" for m in report.measured)
    print(
        f"  the search chose, over {len(report.chosen)} units (FFN blocks, attention blocks, other layers): {summary}"
    )
    print(f"  predicted {report.predicted:.2f}x; measured while searching: {measured}")


def _quality_and_speed(
    models: dict[str, Callable[..., torch.Tensor]],
    sets: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]],
) -> None:
    dense = models["dense fp32 torch"]
    with torch.no_grad():
        references = {k: _embed(dense, v) for k, v in sets.items()}  # once, not once per model
    timed = next(iter(sets.values()))[0]
    timings = interleaved_timings(
        {n: _call(m, timed) for n, m in models.items()}, rounds=30, warmup=3, burst=2
    )
    base, peer = timings["dense fp32 torch"].median, timings["torch dynamic int8"].median
    names = list(sets)
    print(
        f"\n| model | {' | '.join(f'{n} cos' for n in names)} | everyday NN | ms (quartiles) | vs dense fp32 | vs torch int8 |"
    )
    print("|---|" + "---|" * (len(names) + 5))
    for name, model in models.items():
        with torch.no_grad():
            quality = {k: embedding_quality(references[k], _embed(model, v)) for k, v in sets.items()}
        t: Timing = timings[name]
        cosines = " | ".join(f"{quality[k][0]:.3f}" for k in names)
        print(
            f"| {name} | {cosines} | {quality['everyday'][1]:.2f} | {t.median:.1f} ({t.low:.1f}–{t.high:.1f}) | "
            f"{base / t.median:.2f}x | {peer / t.median:.2f}x |"
        )
    print(
        "\ncosine: of each model's sentence embeddings to the dense model's; NN: how often a sentence's most "
        "similar other sentence stays the same; speed: one batch of 16 x 32 tokens, 30 interleaved rounds"
    )


def _embed(
    model: Callable[..., torch.Tensor], batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    return torch.cat([model(*batch) for batch in batches])


def _call(
    model: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, torch.Tensor]
) -> Callable[[], object]:
    return lambda: model(*inputs)


def _medians(calls: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median ms of 20 interleaved rounds each (``tilefx.timing``)."""
    return {name: t.median for name, t in interleaved_timings(calls, rounds=20, warmup=3).items()}


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
    resnet50_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
