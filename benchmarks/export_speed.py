"""The standalone artifact against torch: dense eager, tilefx from torch, the artifact (medians).

For each model, in one process: the dense model in torch eager; ``tilefx.compile`` of the
optimized model (sparse kernels called from torch); and ``tilefx.export`` of the same optimized
model loaded with ``tilefx.runtime.load`` (whole model in TVM's Relax VM, dense layers on our
kernels at full density). The three are timed in alternating blocks (a block of calls of one,
then of the next), so drift on a shared machine hits all three alike; each median is over all
its calls. Max relative error is max |artifact − optimized torch| / max |optimized torch| (and
the same for ``tilefx.compile``'s output, which runs the same kernels from torch).

Models: all-MiniLM-L6-v2 (real weights, ``tilefx.zoo.load_minilm``) and ResNet-18 (torchvision,
random weights) at 80% 16×1 blocks; ``--resnet50`` adds ResNet-50 at 50% channels.

    .venv/bin/python benchmarks/export_speed.py [--resnet50] [--rounds 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The artifact runs on TVM's pool next to torch's OpenMP team here; both spinning after each op
# would share the 2 cores (see lowering.openmp_launch). A deployment without torch need not set it.
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

import tilefx  # noqa: E402
import tilefx.runtime  # noqa: E402
from tilefx.export_artifact import relative_error  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    name: str
    model: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    recipe: tilefx.Recipe
    note: str


@dataclass(frozen=True)
class Row:
    name: str
    note: str
    eager_ms: float
    tilefx_ms: float
    artifact_ms: float
    max_rel_error: float
    compile_rel_error: float
    export_s: float
    layers: str


def minilm_case(batch: int, length: int) -> Case:
    from tilefx.zoo import SENTENCES, load_minilm

    minilm = load_minilm()
    ids, mask = minilm.batches(SENTENCES, size=batch, length=length)[0]
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(16, 1), sparsity=0.8))
    return Case(
        "all-MiniLM-L6-v2", minilm.model, (ids, mask), recipe, f"real weights, {batch}×{length} tokens"
    )


def resnet_case(depth: int, batch: int, recipe: tilefx.Recipe, what: str) -> Case:
    torch.manual_seed(0)
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    x = torch.randn(batch, 3, 224, 224)
    return Case(f"ResNet-{depth}", model, (x,), recipe, f"random weights, batch {batch}, {what}")


def first(result: Any) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    if hasattr(result, "last_hidden_state"):
        return result.last_hidden_state  # type: ignore[no-any-return]
    return first(torch.utils._pytree.tree_leaves(result)[0])


def timed_blocks(fns: Sequence[Callable[[], object]], rounds: int, block: int) -> list[float]:
    """Median ms of each fn, timed in alternating blocks of ``block`` calls (after one warm-up block)."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for round_ in range(rounds + 1):
            for fn, out in zip(fns, times, strict=True):
                for _ in range(block):
                    start = time.perf_counter()
                    fn()
                    if round_:
                        out.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def run_case(case: Case, directory: Path, rounds: int, block: int) -> Row:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = tilefx.optimize(case.model, case.inputs, recipe=case.recipe)
        compiled = tilefx.compile(gm)
    started = time.perf_counter()
    path = tilefx.export(gm, case.inputs, directory / case.name, recipe=case.recipe)
    export_s = time.perf_counter() - started
    artifact = tilefx.runtime.load(path)
    arrays = [x.numpy() for x in case.inputs]
    with torch.no_grad():
        reference = first(gm(*case.inputs)).numpy()
    got = artifact(*arrays)
    got = got if isinstance(got, np.ndarray) else got[0]
    with torch.no_grad():
        from_torch = first(compiled(*case.inputs)).numpy()
    layers = artifact.manifest["layers"]
    pruned = sum(layer["pruned"] for layer in layers)
    eager, lowered, standalone = timed_blocks(
        [lambda: case.model(*case.inputs), lambda: compiled(*case.inputs), lambda: artifact(*arrays)],
        rounds,
        block,
    )
    return Row(
        case.name,
        case.note,
        eager,
        lowered,
        standalone,
        relative_error(got, reference),
        relative_error(from_torch, reference),
        export_s,
        f"{len(layers)} on our kernels ({pruned} pruned, {len(layers) - pruned} dense)",
    )


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| model | dense eager ms | tilefx.compile ms | artifact ms | artifact / tilefx | max rel err artifact | max rel err tilefx.compile | export s | layers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} ({r.note}) | {r.eager_ms:.2f} | {r.tilefx_ms:.2f} | {r.artifact_ms:.2f} | "
            f"{r.artifact_ms / r.tilefx_ms:.2f}× | {r.max_rel_error:.1e} | {r.compile_rel_error:.1e} | {r.export_s:.0f} | {r.layers} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resnet50", action="store_true", help="add ResNet-50 at 50%% channels")
    parser.add_argument("--only", choices=["minilm", "resnet18", "resnet50"], default=None)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and TVM threads (default: all cores)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "export_speed.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads is not None:  # before TVM loads: its pool and the kernels' targets read it
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    blocks = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(16, 1), sparsity=0.8))
    cases: list[Callable[[], Case]] = [
        lambda: minilm_case(4, 128),
        lambda: resnet_case(18, 1, blocks, "80% 16×1 blocks"),
    ]
    names = ["minilm", "resnet18"]
    if args.resnet50 or args.only == "resnet50":
        channels = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5))
        cases.append(lambda: resnet_case(50, 1, channels, "50% channels"))
        names.append("resnet50")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in zip(names, cases, strict=True):
            if args.only not in (None, name):
                continue
            row = run_case(make(), Path(tmp), args.rounds, args.block)
            print(table([row]).splitlines()[-1], flush=True)
            rows.append(row)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    text = (
        f"# Standalone artifact vs torch\n\n"
        f"Command: `.venv/bin/python benchmarks/export_speed.py {' '.join(sys.argv[1:])}` at commit {commit}.\n"
        f"Machine: {machine()}; shared with other jobs (up to 8 helpers on 2 cores), so absolute times are noisy;\n"
        f"the three columns of a row were timed side by side in alternating blocks of {args.block} calls, "
        f"{args.rounds} rounds.\n\n{table(rows)}\n"
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
