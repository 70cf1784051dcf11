"""A whole BERT-base FFN block through the public API: tilefx vs torch dense vs torch CSR, one process.

    OMP_NUM_THREADS=2 TVM_NUM_THREADS=2 python benchmarks/ffn_block.py [--runs 20] [--quick]

The block is fc1 (768→3072) → GELU → fc2 (3072→768) on 128 tokens, as in every BERT-base layer.
For each block shape and sparsity, both weights are block-pruned by ``tilefx.optimize``
(``BlockPruning(reorder="none")``: TETRIS changes which blocks survive, not the kernels' speed)
and the result lowered by ``tilefx.compile(fallback="never")``. Contenders, timed in
interleaved rounds (each makes two untimed calls, then the timed one), medians reported:

* ``torch dense``: the unpruned block in eager torch;
* ``oneDNN dense``: the unpruned block on oneDNN with prepacked weights
  (``_measure.onednn_linear``), torch's faster dense GEMM on AMD cores; ``best dense`` is the
  faster of the two;
* ``tilefx``: the compiled block as users get it, where fc1 hands its output to fc2 transposed
  (``runtime.sparse_modules``) when both run the token-major template;
* ``no hand-over``: the same block compiled with ``hand_over=False``, so each layer
  transposes its input in and its output back, as a lone kernel does;
* ``torch CSR``: both pruned weights as ``to_sparse_csr`` matrices applied to the transposed
  activations (CSR's best layout, the transposes not counted).

Every tilefx result is checked against the pruned eager model before timing.
Never imported by tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import tilefx
from tilefx.runtime.sparse_modules import BsrLinear
from tilefx.timing import interleaved_times

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import onednn_linear  # noqa: E402

TOKENS, HIDDEN, INNER = 128, 768, 3072
BLOCKS = ((16, 1), (8, 8), (32, 32), (1, 16), (1, 1))
SPARSITIES = (0.5, 0.8, 0.9)


class Ffn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(HIDDEN, INNER)
        self.fc2 = torch.nn.Linear(INNER, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _row(dense: Ffn, x: torch.Tensor, block: tuple[int, int], sparsity: float, runs: int) -> str:
    """Prune, compile, check and time one (block, sparsity); the table row."""
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=block, sparsity=sparsity, reorder="none"))
    pruned = tilefx.optimize(dense, (x,), recipe=recipe)
    compiled = tilefx.compile(pruned, target="llvm", fallback="never")
    row_major = tilefx.compile(pruned, target="llvm", fallback="never", hand_over=False)
    handing = [m for m in compiled.modules() if isinstance(m, BsrLinear) and m.transposed_output]
    with torch.no_grad():
        expected = pruned(x)
        error = float((compiled(x) - expected).abs().max() / expected.abs().max())
    w1, w2 = (pruned.get_parameter(f"fc{i}.weight").detach().to_sparse_csr() for i in (1, 2))
    b1, b2 = (pruned.get_parameter(f"fc{i}.bias").detach()[:, None] for i in (1, 2))
    xt = x[0].T.contiguous()

    fc1, fc2 = (onednn_linear(layer.weight, layer.bias) for layer in (dense.fc1, dense.fc2))
    calls = {
        "tilefx": lambda: compiled(x),
        "no hand-over": lambda: row_major(x),
        "torch dense": lambda: dense(x),
        "torch CSR": lambda: torch.addmm(b2, w2, F.gelu(torch.addmm(b1, w1, xt))),
    }
    if fc1 is not None and fc2 is not None:
        calls["oneDNN dense"] = lambda: fc2(F.gelu(fc1(x[0])))
    times = interleaved_times(calls, rounds=runs, warmup=2, burst=3)
    ms = {name: statistics.median(ts) for name, ts in times.items()}
    d = ms["torch dense"]
    best = min(d, ms.get("oneDNN dense", d))
    onednn_ms = f"{ms['oneDNN dense']:.3f}" if "oneDNN dense" in ms else "–"
    return (
        f"| {sparsity:.2f} | {block[0]}x{block[1]} | {ms['tilefx']:.3f} | {ms['no hand-over']:.3f} "
        f"| {d:.3f} | {ms['torch CSR']:.3f} | {d / ms['tilefx']:.2f}x | {d / ms['no hand-over']:.2f}x "
        f"| {ms['torch CSR'] / ms['tilefx']:.2f}x | {'yes' if handing else 'no'} | {error:.1e} "
        f"| {onednn_ms} | {best / ms['tilefx']:.2f}x |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20, help="timed calls per contender (median reported)")
    parser.add_argument("--quick", action="store_true", help="16x1 and 8x8 at 90% only")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(0)
    dense = Ffn().eval()
    x = torch.randn(1, TOKENS, HIDDEN)
    blocks = ((16, 1), (8, 8)) if args.quick else BLOCKS
    sparsities = (0.9,) if args.quick else SPARSITIES
    print(
        f"BERT-base FFN block, {TOKENS} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.runs} runs, load average at start {os.getloadavg()[0]:.2f}\n"
    )
    print(
        "| sparsity | block | tilefx ms | no hand-over ms | torch dense ms | torch CSR ms | vs dense "
        "| no hand-over vs dense | vs CSR | fc1 hands Yᵀ to fc2 | max rel err | oneDNN dense ms "
        "| vs best dense |"
    )
    print("|---" * 13 + "|")
    for sparsity in sparsities:
        for block in blocks:
            print(_row(dense, x, block, sparsity, args.runs), flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
