"""Block-sparse kernel benchmark: tilefx vs torch dense vs torch CSR vs scipy BSR, one process.

    TVM_NUM_THREADS=2 OMP_NUM_THREADS=2 python benchmarks/kernel_speed.py [--quick | --grid] [--runs 20]
        [--shape 'BERT FFN1'] [--sparsity 0.9 ...] [--block 16x1 ...]

Shapes: BERT-base FFN (128×768→3072 and 128×3072→768) and a ResNet-50 3×3 conv (layer2:
128→128 channels on 28×28, batch 1); ``--grid`` instead crosses MiniLM's and BERT-base's FFN
shapes with blocks 1×1, 1×4, 4×1, 8×1, 16×1, 32×32 and sparsities 30–95%. For each (shape, sparsity, block), tilefx, torch dense and
torch CSR are timed in rounds (so drifting load hits them alike); in each round every contender
makes two untimed calls and then the timed one (``burst=3``), so each is measured in its steady
state rather than just after another library's thread pool. The table shows medians (and, as a
load-robust check, the ratio of minima). ``ideal`` is 1/(1−s) over torch dense; ``of ideal`` is
the achieved speedup over dense divided by it. ``alternating`` times tilefx and torch dense in
strict alternation, which is what a compiled model does (a TVM kernel between torch ops): each
call then starts next to the other library's just-used pool. scipy BSR (single-threaded, no
pool) is timed on its own. The roofline columns give the kernel's flops and bytes (W blocks +
indices + X + Y, fp32) and the GFLOP/s and GB/s it reached. ``in FFN`` times the FFN layers in
the layout ``tilefx.compile`` runs them in when FFN1 → GELU → FFN2 are both sparse (FFN1 writes
Yᵀ, FFN2 reads it without a transpose; only where the ``panels`` template runs, else "–"),
in the same rounds as the others. ``torch oneDNN`` is the same dense linear through oneDNN on a
prepacked weight (``_measure.onednn_linear``; a conv already runs on oneDNN), and ``best dense``
the faster of the two: on AMD cores MKL's sgemm behind ``F.linear`` ran at under half of it.
Never imported by tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import scipy.sparse as sp
import torch
import torch.nn.functional as F

from tilefx.lowering import compat, openmp_launch
from tilefx.lowering.build import KernelCache
from tilefx.lowering.kernels.spec import Conv2dGeometry, KernelSpec
from tilefx.lowering.schedules.cpu import takes_transposed
from tilefx.runtime.packing import pack_bsr
from tilefx.timing import interleaved_times

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import onednn_linear  # noqa: E402

SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
BLOCKS = ((1, 1), (16, 1), (1, 16), (8, 8), (32, 32))


@dataclass(frozen=True)
class Shape:
    name: str
    geometry: Conv2dGeometry
    n: int
    #: (Xᵀ in, Yᵀ out): the layout this layer runs in inside FFN1 → GELU → FFN2 once both are
    #: sparse (``runtime.sparse_modules``): FFN1 hands Yᵀ to FFN2, which reads it in place.
    in_ffn: tuple[bool, bool] | None = None


#: ``--grid``: the granularity x sparsity grid on MiniLM's and BERT-base's FFN shapes.
GRID_SHAPES = (
    Shape("MiniLM FFN1 128x384->1536", Conv2dGeometry.dense(128, 384), 1536, in_ffn=(False, True)),
    Shape("MiniLM FFN2 128x1536->384", Conv2dGeometry.dense(128, 1536), 384, in_ffn=(True, False)),
    Shape("BERT FFN1 128x768->3072", Conv2dGeometry.dense(128, 768), 3072, in_ffn=(False, True)),
)
GRID_SPARSITIES = (0.3, 0.5, 0.7, 0.9, 0.95)
GRID_BLOCKS = ((1, 1), (1, 4), (4, 1), (8, 1), (16, 1), (32, 32))

SHAPES = (
    Shape("BERT FFN1 128x768->3072", Conv2dGeometry.dense(128, 768), 3072, in_ffn=(False, True)),
    Shape("BERT FFN2 128x3072->768", Conv2dGeometry.dense(128, 3072), 768, in_ffn=(True, False)),
    Shape("R50 conv3x3 128->128 @28x28", Conv2dGeometry(1, 128, 28, 28, (3, 3), (1, 1), (1, 1)), 128),
)


def block_sparse(n: int, k: int, block: tuple[int, int], sparsity: float, gen: torch.Generator):
    r, c = block
    grid = (n // r) * (k // c)
    keep = torch.zeros(grid, dtype=torch.bool)
    keep[torch.randperm(grid, generator=gen)[: round(grid * (1 - sparsity))]] = True
    mask = keep.reshape(n // r, k // c)
    weight = torch.randn(n, k, generator=gen) * mask.repeat_interleave(r, 0).repeat_interleave(c, 1)
    return weight, mask


def contenders(shape: Shape, weight: torch.Tensor, mask: torch.Tensor, block, cache: KernelCache, target, x):
    g = shape.geometry
    packed = pack_bsr(weight, block, mask)
    spec = KernelSpec(g, shape.n, block, packed.nnzb)
    before = cache.compile_seconds
    kernel = cache.kernel(spec, target)
    compile_s = cache.compile_seconds - before
    bias = torch.zeros(shape.n)
    y = torch.empty(g.output_shape(shape.n))
    args = (x, packed.data, packed.indices, packed.indptr, bias, y)
    if g.is_dense:
        xt = x.T.contiguous()  # given to the sparse baselines for free: their best layout
        w_csr, w_bsr, xt_np = (
            weight.to_sparse_csr(),
            sp.bsr_matrix(weight.numpy(), blocksize=block),
            xt.numpy(),
        )
        fns = {
            "tilefx": lambda: kernel(*args),
            "torch dense": lambda: F.linear(x, weight),
            "torch CSR": lambda: w_csr @ xt,
            "scipy BSR": lambda: w_bsr @ xt_np,
        }
        onednn = onednn_linear(weight)
        if onednn is not None:
            fns["torch oneDNN"] = lambda: onednn(x)
        chained = shape.in_ffn and dataclasses.replace(
            spec, x_transposed=shape.in_ffn[0], y_transposed=shape.in_ffn[1]
        )
        if chained and takes_transposed(chained, compat.vector_lanes(target)):
            ffn_kernel = cache.kernel(chained, target)
            ffn_args = (xt if chained.x_transposed else x, *args[1:5], torch.empty(chained.y_shape))
            fns["tilefx in FFN"] = lambda: ffn_kernel(*ffn_args)
            ffn_kernel(*ffn_args)
            ffn_y = ffn_args[5].T if chained.y_transposed else ffn_args[5]
            assert torch.allclose(ffn_y, F.linear(x, weight), rtol=1e-3, atol=1e-3), (
                "transposed kernel disagrees"
            )
    else:
        w4 = weight.reshape(shape.n, g.in_channels, *g.kernel)
        w_csr, w_bsr = weight.to_sparse_csr(), sp.bsr_matrix(weight.numpy(), blocksize=block)
        unfold = dict(kernel_size=g.kernel, padding=g.padding, stride=g.stride, dilation=g.dilation)
        fns = {
            "tilefx": lambda: kernel(*args),
            "torch dense": lambda: F.conv2d(x, w4, padding=g.padding, stride=g.stride, dilation=g.dilation),
            "torch CSR": lambda: w_csr @ F.unfold(x, **unfold)[0],
            "scipy BSR": lambda: w_bsr @ F.unfold(x, **unfold)[0].numpy(),
        }
    kernel(*args)
    reference = F.linear(x, weight) if g.is_dense else fns["torch dense"]()
    error = float((y - reference).abs().max())
    return fns, compile_s, error, packed.nnzb


def roofline(shape: Shape, block, nnzb: int) -> tuple[float, float]:
    """(flops, bytes) of one kernel call: stored blocks only, every array read or written once."""
    g, (r, c) = shape.geometry, block
    flops = 2.0 * g.m * nnzb * r * c
    nbytes = 4.0 * (nnzb * r * c + nnzb + shape.n // r + 1 + g.m * g.k + g.m * shape.n)
    return flops, nbytes


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="FFN1 only, sparsity 0.5/0.9, blocks 16x1 and 8x8"
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="MiniLM and BERT FFN shapes x blocks 1x1..32x32 x sparsities 30..95%%",
    )
    parser.add_argument("--runs", type=int, default=20, help="timed calls per contender (median reported)")
    parser.add_argument("--shape", help="only the shapes whose name contains this (e.g. 'BERT FFN1')")
    parser.add_argument("--sparsity", type=float, action="append", help="only these sparsities (repeatable)")
    parser.add_argument("--block", action="append", help="only these blocks, e.g. 16x1 (repeatable)")
    args = parser.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    shapes = GRID_SHAPES if args.grid else SHAPES[:1] if args.quick else SHAPES
    sparsities = GRID_SPARSITIES if args.grid else (0.5, 0.9) if args.quick else SPARSITIES
    blocks = GRID_BLOCKS if args.grid else ((16, 1), (8, 8)) if args.quick else BLOCKS
    if args.shape:
        shapes = tuple(s for s in shapes if args.shape in s.name)
    if args.sparsity:
        sparsities = tuple(args.sparsity)
    if args.block:
        blocks = tuple(tuple(int(side) for side in b.split("x")) for b in args.block)  # type: ignore[misc]
    target = compat.make_target("llvm")
    cache = KernelCache()
    gen = torch.Generator().manual_seed(0)
    load = os.getloadavg()[0]
    print(
        f"target {target}, torch threads {threads}, TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, kernels on torch's OpenMP threads: "
        f"{openmp_launch.available()[0]}, "
        f"{args.runs} runs, load average at start {load:.2f}\n"
    )
    for shape in shapes:
        print(f"### {shape.name}  (M={shape.geometry.m}, K={shape.geometry.k}, N={shape.n})\n")
        print(
            "| sparsity | block | tilefx ms | torch dense ms | torch CSR ms | scipy BSR ms | vs dense | ideal "
            "| of ideal | vs CSR | vs scipy BSR | alternating vs dense | best-of vs dense "
            "| GFLOP/s | GB/s | compile s | max err | in FFN vs dense | torch oneDNN ms "
            "| vs best dense | in FFN vs best dense |"
        )
        print("|---" * 21 + "|")
        x = torch.randn(shape.geometry.input_shape, generator=gen)
        for sparsity in sparsities:
            for block in blocks:
                weight, mask = block_sparse(shape.n, shape.geometry.k, block, sparsity, gen)
                fns, compile_s, error, nnzb = contenders(shape, weight, mask, block, cache, target, x)
                threaded = {
                    name: fns[name]
                    for name in ("tilefx", "torch dense", "torch oneDNN", "torch CSR", "tilefx in FFN")
                    if name in fns
                }
                times = interleaved_times(threaded, rounds=args.runs, warmup=1, burst=3)
                pair = {name: fns[name] for name in ("tilefx", "torch dense")}
                alternating = interleaved_times(pair, rounds=args.runs, warmup=3)
                times |= interleaved_times({"scipy BSR": fns["scipy BSR"]}, rounds=args.runs, warmup=1)
                ms = {name: statistics.median(ts) for name, ts in times.items()}
                # Best-of ratio: on a loaded machine preemptions inflate medians, minima much less.
                best = min(times["torch dense"]) / min(times["tilefx"])
                alt = statistics.median(alternating["torch dense"]) / statistics.median(alternating["tilefx"])
                ideal = 1.0 / (1.0 - sparsity)
                speedup = ms["torch dense"] / ms["tilefx"]
                flops, nbytes = roofline(shape, block, nnzb)
                in_ffn = f"{ms['torch dense'] / ms['tilefx in FFN']:.2f}x" if "tilefx in FFN" in ms else "–"
                best_dense = min(ms["torch dense"], ms.get("torch oneDNN", float("inf")))
                onednn_ms = f"{ms['torch oneDNN']:.3f}" if "torch oneDNN" in ms else "–"
                in_ffn_best = f"{best_dense / ms['tilefx in FFN']:.2f}x" if "tilefx in FFN" in ms else "–"
                print(
                    f"| {sparsity:.2f} | {block[0]}x{block[1]} | {ms['tilefx']:.3f} | {ms['torch dense']:.3f} "
                    f"| {ms['torch CSR']:.3f} | {ms['scipy BSR']:.3f} | {speedup:.2f}x | {ideal:.1f}x "
                    f"| {speedup / ideal:.2f} | {ms['torch CSR'] / ms['tilefx']:.2f}x "
                    f"| {ms['scipy BSR'] / ms['tilefx']:.1f}x | {alt:.2f}x | {best:.2f}x "
                    f"| {flops / ms['tilefx'] / 1e6:.1f} | {nbytes / ms['tilefx'] / 1e6:.1f} | {compile_s:.2f} "
                    f"| {error:.1e} | {in_ffn} | {onednn_ms} | {best_dense / ms['tilefx']:.2f}x "
                    f"| {in_ffn_best} |",
                    flush=True,
                )
        print()
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
