"""`make demo`: the main job end to end on real models, printing what each stage did.

1. torchvision ResNet-50 (architecture as shipped; weights random since none ship offline, with
   batch-norm statistics randomised so folding has real work): capture, the default pipeline,
   per-pass timings, verification, size and eager latency before/after.
2. all-MiniLM-L6-v2 with its real pretrained weights: capture and verify, and the embedding
   similarity of real sentences before/after.
"""

from __future__ import annotations

import logging
import sys
import time

import torch

import tilefx
from tilefx.passes.infra import TimingInstrument
from tilefx.report import count_parameters, max_relative_error, median_ms, pass_table

__all__ = ["main"]


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
    import torchvision

    _section("ResNet-50 (torchvision): capture -> fold BN -> clean up, verified")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    _randomize_batchnorm(model)
    x = torch.randn(1, 3, 224, 224)
    timing = TimingInstrument()
    start = time.perf_counter()
    optimized = tilefx.optimize(model, (x,), instruments=[timing])
    print(
        f"optimize: {time.perf_counter() - start:.1f} s (capture + passes + verification after each pass)\n"
    )
    print(pass_table(timing.timings))
    with torch.no_grad():
        error = max_relative_error(optimized(x), model(x))
    print(f"\nverified: max |optimized - original| / max |original| = {error:.2e} (allowed 1e-5)")
    print(f"parameters: {count_parameters(model):,} -> {count_parameters(optimized):,}")
    dense, ours = median_ms(lambda: model(x)), median_ms(lambda: optimized(x))
    print(f"eager latency (median of 20): {dense:.1f} ms -> {ours:.1f} ms ({dense / ours:.2f}x)")


def minilm_demo() -> None:
    from tilefx.zoo import load_minilm, mean_pooled

    _section("all-MiniLM-L6-v2 (real pretrained weights): capture and verify")
    minilm = load_minilm()
    encoded = minilm.encode()
    inputs = (encoded["input_ids"], encoded["attention_mask"])
    timing = TimingInstrument()
    optimized = tilefx.optimize(minilm.model, inputs, instruments=[timing])
    print(pass_table(timing.timings))
    with torch.no_grad():
        reference = minilm.model(*inputs).last_hidden_state
        ours = optimized(*inputs)["last_hidden_state"]
    emb_ref, emb_ours = mean_pooled(reference, inputs[1]), mean_pooled(ours, inputs[1])
    cosine = torch.nn.functional.cosine_similarity(emb_ref, emb_ours).min()
    print(
        f"\nverified: max relative error {max_relative_error(ours, reference):.2e}; "
        f"min sentence-embedding cosine vs original {float(cosine):.6f} over {len(inputs[0])} sentences"
    )


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    print(f"tilefx {tilefx.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    resnet50_demo()
    minilm_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
