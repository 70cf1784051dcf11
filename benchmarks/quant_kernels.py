"""int8 and bf16 kernels against torch's fp32 and int8 linears, all of a shape in one interleaved run.

    TVM_NUM_THREADS=2 OMP_NUM_THREADS=2 python benchmarks/quant_kernels.py [--quick] [--runs 30] [--save PATH]

Shapes: all-MiniLM-L6-v2's linears at 16 sentences × 32 tokens (M = 512: 384→384, 384→1536,
1536→384) and BERT-base's FFN at M = 128 (768→3072, 3072→768). Per shape every contender takes
turns in the same rounds (``tilefx.timing``: each turn two untimed calls, then the timed one),
so load drifting on a shared machine hits them alike:

* torch fp32 ``F.linear`` (MKL sgemm), oneDNN fp32 on a prepacked weight
  (``_measure.onednn_linear``), torch dynamic int8 (``quantize_dynamic``: fbgemm, per-tensor
  7-bit activations quantized per call);
* tilefx int8 dense (VNNI panels), int8 BSR 16×4 / 4×4 / 1×4 at 50–90% sparsity, bf16 dense
  and bf16 BSR 4×2 (when the CPU has AVX512-BF16), each the kernel ``tilefx.compile`` runs,
  quantization of X included (X is fp32 in, Y fp32 out).

Each tilefx kernel is checked against the fake-quant reference before timing. The table gives
median ms with quartiles and the ratio of medians against torch dynamic int8 and the faster fp32
linear; the last lines single out BERT's FFN1 (768→3072) at 80% 16×4 against torch's int8
linear. ``--quick``: one MiniLM shape at 80% only (a smoke run). Never imported by tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tilefx.lowering import compat
from tilefx.lowering.build import KernelCache
from tilefx.lowering.kernels.spec import Conv2dGeometry, KernelSpec
from tilefx.passes import quant_ops as Q
from tilefx.runtime.packing import (
    NarrowWeight,
    pack_bf16_bsr,
    pack_bf16_dense,
    pack_int8_bsr,
    pack_int8_dense,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import Timing, interleaved_timings, machine, onednn_linear, save_result  # noqa: E402

SPARSITIES = (0.5, 0.7, 0.8, 0.9)
INT8_BLOCKS = ((16, 4), (4, 4), (1, 4))
BF16_BLOCK = (4, 2)
DYNAMIC_INT8 = "torch dynamic int8"


@dataclass(frozen=True)
class Shape:
    name: str
    m: int
    k: int
    n: int


SHAPES = (
    Shape("MiniLM attention 512x384->384", 512, 384, 384),
    Shape("MiniLM FFN1 512x384->1536", 512, 384, 1536),
    Shape("MiniLM FFN2 512x1536->384", 512, 1536, 384),
    Shape("BERT FFN1 128x768->3072", 128, 768, 3072),
    Shape("BERT FFN2 128x3072->768", 128, 3072, 768),
)


def _mask(shape: Shape, block: tuple[int, int], sparsity: float, gen: torch.Generator) -> torch.Tensor:
    r, c = block
    grid = (shape.n // r) * (shape.k // c)
    keep = torch.zeros(grid, dtype=torch.bool)
    keep[torch.randperm(grid, generator=gen)[: round(grid * (1 - sparsity))]] = True
    return keep.reshape(shape.n // r, shape.k // c)


def _kernel_call(
    packed: NarrowWeight,
    shape: Shape,
    cache: KernelCache,
    target: object,
    x: torch.Tensor,
    bias: torch.Tensor,
) -> tuple[Callable[[], object], torch.Tensor]:
    spec = KernelSpec(
        Conv2dGeometry.dense(shape.m, shape.k),
        shape.n,
        packed.block,
        packed.nnzb,
        number_format=packed.number_format,  # type: ignore[arg-type]
        weight_layout=packed.layout,  # type: ignore[arg-type]
    )
    kernel = cache.kernel(spec, target)  # type: ignore[arg-type]
    y = torch.empty(shape.m, shape.n)
    return (lambda: kernel(x, *packed.arrays, bias, y)), y


def contenders(
    shape: Shape, sparsities: tuple[float, ...], bf16: bool, cache: KernelCache, target: object
) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    x, bias = torch.randn(shape.m, shape.k, generator=gen), torch.randn(shape.n, generator=gen)
    weight = torch.randn(shape.n, shape.k, generator=gen) / shape.k**0.5
    linear = nn.Linear(shape.k, shape.n)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        dynamic = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear})
    calls: dict[str, Callable[[], object]] = {"torch fp32 F.linear": lambda: F.linear(x, weight, bias)}
    onednn = onednn_linear(weight, bias)
    if onednn is not None:
        calls["oneDNN fp32"] = lambda: onednn(x)
    calls[DYNAMIC_INT8] = lambda: dynamic(x)

    def add(name: str, packed: NarrowWeight, masked: torch.Tensor) -> None:
        call, y = _kernel_call(packed, shape, cache, target, x, bias)
        call()
        if packed.number_format == "int8":
            q = Q.quantize_weight(masked)
            expected = F.linear(Q.fake_quant_rows_ref(x).double(), q.dequantized().double(), bias.double())
            step = Q.quantize_rows(x)[1].double()[:, None] * q.scales.double()[None, :]
            assert float(((y.double() - expected).abs() / step).max()) < 0.5, f"{name} disagrees"
        else:
            expected = F.linear(Q.round_bf16_ref(x).double(), masked.double(), bias.double())
            assert float((y.double() - expected).abs().max()) <= 1e-4 * float(expected.abs().max()), name
        calls[name] = call

    q = Q.quantize_weight(weight)
    add("tilefx int8 dense", pack_int8_dense(q.codes, q.scales, None), weight)
    if bf16:
        rounded = Q.round_bf16_ref(weight)
        add("tilefx bf16 dense", pack_bf16_dense(rounded), rounded)
    for sparsity in sparsities:
        for block in INT8_BLOCKS:
            mask = _mask(shape, block, sparsity, gen)
            masked = weight * mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
            qm = Q.quantize_weight(masked)
            packed = pack_int8_bsr(qm.codes, qm.scales, block, mask, None)
            add(f"tilefx int8 BSR {block[0]}x{block[1]} @{sparsity:.0%}", packed, masked)
        if bf16:
            mask = _mask(shape, BF16_BLOCK, sparsity, gen)
            masked = Q.round_bf16_ref(weight * mask.repeat_interleave(4, 0).repeat_interleave(2, 1))
            add(f"tilefx bf16 BSR 4x2 @{sparsity:.0%}", pack_bf16_bsr(masked, BF16_BLOCK, mask), masked)
    return calls


def table(timings: dict[str, Timing]) -> str:
    fp32 = min(
        timings["torch fp32 F.linear"].median,
        timings.get("oneDNN fp32", timings["torch fp32 F.linear"]).median,
    )
    dynamic = timings[DYNAMIC_INT8].median
    lines = [
        "| contender | median ms | quartiles ms | vs torch dynamic int8 | vs best fp32 |",
        "|---|---|---|---|---|",
    ]
    for name, t in timings.items():
        lines.append(
            f"| {name} | {t.median:.3f} | {t.low:.3f}–{t.high:.3f} | {dynamic / t.median:.2f}x | {fp32 / t.median:.2f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one MiniLM shape at 80%% only")
    parser.add_argument("--runs", type=int, default=30, help="interleaved rounds per shape")
    parser.add_argument("--save", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    target = compat.make_target("llvm")
    features = compat.cpu_features(target)
    if "avx512vnni" not in features:
        print("this CPU has no AVX512-VNNI: the int8 kernels cannot run here")
        return 1
    bf16 = "avx512bf16" in features
    shapes = SHAPES[:1] if args.quick else SHAPES
    sparsities = (0.8,) if args.quick else SPARSITIES
    cache = KernelCache()
    sections = [
        f"target {target}; {machine()}; bf16 kernels: {'yes' if bf16 else 'no (no AVX512-BF16)'}; "
        f"{args.runs} rounds; load average at start {os.getloadavg()[0]:.2f}"
    ]
    print(sections[0] + "\n", flush=True)
    lone = None
    for shape in shapes:
        calls = contenders(shape, sparsities, bf16, cache, target)
        timings = interleaved_timings(calls, rounds=args.runs, warmup=2, burst=3)
        section = f"### {shape.name}\n\n{table(timings)}\n"
        print(section, flush=True)
        sections.append(section)
        lone_name = "tilefx int8 BSR 16x4 @80%"
        if shape.k == 768 and shape.n == 3072 and lone_name in timings:
            lone = timings[lone_name].median, timings[DYNAMIC_INT8].median
    if lone is not None:
        line = (
            f"BERT FFN1 768x3072 alone at 80% 16x4: int8 BSR {lone[0]:.3f} ms vs torch's int8 linear "
            f"{lone[1]:.3f} ms (medians): {lone[1] / lone[0]:.2f}x"
        )
        print(line)
        sections.append(line)
    sections.append(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.save is not None:
        save_result(args.save, "int8 and bf16 kernels (benchmarks/quant_kernels.py)", "\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
