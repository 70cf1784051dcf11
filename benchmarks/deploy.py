"""Deployment paths side by side: eager, tilefx from torch, the standalone artifact, torch.compile.

Per model, in one process, timed in rotation (medians of ``--runs``): the dense model in torch
eager; the pruned model in torch eager (the reference for quality); ``tilefx.compile`` of the
pruned graph ("tilefx from torch"); the standalone artifact (``tilefx.export`` + ``runtime.load``);
``torch.compile(backend="tilefx")`` on the dense model with the same recipe; and ``torch.compile``
with its default backend (inductor) on the dense model. Ratios are against tilefx from torch (> 1 =
slower than it). The order of the paths is shuffled in every round. One thread by default: on a
machine shared with other jobs, two threads' barriers wait for whichever thread is descheduled,
which made the same torch graph vary by 1.6x between paths. Quality: max relative error of each
path's output against the pruned torch model (the pruning itself is not recovered: MiniLM's weights
are pruned one-shot, without fine-tuning, so its embeddings are far from the dense model's).

Models: all-MiniLM-L6-v2 (real weights, ``tilefx.zoo.load_minilm``) and ResNet-18 (random
weights: latency does not depend on their values) at 80% 16x1 blocks; ResNet-50 at 50% channels.

    python benchmarks/deploy.py [--runs 20] [--threads 1] [--models minilm,resnet18,resnet50] [--out benchmarks/results/deploy.md]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from tilefx.timing import interleaved_timings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import save_result  # noqa: E402

import tilefx  # noqa: E402
import tilefx.runtime  # noqa: E402
from tilefx.lowering.build import lowering_choices  # noqa: E402
from tilefx.zoo import SENTENCES, load_minilm  # noqa: E402

BLOCKS = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(16, 1), sparsity=0.8, reorder="none"))
CHANNELS = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5))


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    recipe: tilefx.Recipe
    what: str


def cases(names: Sequence[str]) -> list[Case]:
    out = []
    if "minilm" in names:
        minilm = load_minilm()
        ids, mask = minilm.batches(list(SENTENCES), size=16, length=32)[0]
        out.append(
            Case(
                "all-MiniLM-L6-v2",
                minilm.model.eval(),
                (ids, mask),
                BLOCKS,
                "80% 16x1 blocks, batch 16x32 tokens",
            )
        )
    for name, recipe, what in (
        ("resnet18", BLOCKS, "80% 16x1 blocks"),
        ("resnet50", CHANNELS, "50% channels"),
    ):
        if name in names:
            model = torchvision.models.get_model(name, weights=None).eval()
            out.append(Case(name, model, (torch.randn(1, 3, 224, 224),), recipe, f"{what}, batch 1, 224x224"))
    return out


def first_tensor(out: Any) -> torch.Tensor:
    """The model's main output: a tensor, ``last_hidden_state`` of a transformers output, or item 0."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, np.ndarray):
        return torch.from_numpy(out)
    if isinstance(out, dict) or hasattr(out, "last_hidden_state"):
        return first_tensor(out["last_hidden_state"])
    return first_tensor(out[0])


def sentence_cosine(hidden: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean cosine of the mask-averaged token states (the sentence embeddings) to the dense ones."""
    weights = mask.unsqueeze(-1).float()
    pooled, pooled_dense = ((h * weights).sum(1) / weights.sum(1) for h in (hidden, dense))
    return float(torch.nn.functional.cosine_similarity(pooled, pooled_dense, dim=-1).mean())


def max_rel_error(out: Any, reference: torch.Tensor) -> float:
    got = first_tensor(out).detach().float()
    return float((got - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


class LoweringLog(logging.Handler):
    """Collects ``tilefx.lowering.build``'s "lowered N of M sparse layers" lines while active."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.logger = logging.getLogger("tilefx.lowering.build")

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("lowered "):
            self.messages.append(record.getMessage())

    def __enter__(self) -> LoweringLog:
        self.level_before = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)


def timed(label: str, build: Callable[[], Any], notes: list[str]) -> Any:
    start = time.perf_counter()
    result = build()
    notes.append(f"{label}: {time.perf_counter() - start:.1f} s")
    return result


#: Runs in a fresh interpreter where ``import torch`` fails: loads the artifact, runs it on the saved
#: inputs and saves its first output.
_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
import numpy as np
import tilefx.runtime
artifact, inputs, out = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
y = tilefx.runtime.load(artifact)(*[np.load(p) for p in inputs])
np.save(out, y[0] if isinstance(y, tuple) else y)
assert "torch" not in {name.split(".")[0] for name, m in sys.modules.items() if m is not None}
"""


def error_without_torch(path: Path, inputs: tuple[torch.Tensor, ...], reference: torch.Tensor) -> float:
    """Max relative error of the artifact run in a fresh process that cannot import torch."""
    files = [path.parent / f"input_{i}.npy" for i in range(len(inputs))]
    for file, tensor in zip(files, inputs, strict=True):
        np.save(file, tensor.numpy())
    out = path.parent / "output.npy"
    subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, str(path), *map(str, files), str(out)], check=True)
    return max_rel_error(np.load(out), reference)


def artifact_call(
    gm: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...], work: Path, notes: list[str]
) -> tuple[Path, Callable[[], Any]]:
    """The standalone artifact's directory and its callable on numpy inputs."""
    path = timed("tilefx.export", lambda: tilefx.export(gm, inputs, work / "artifact", target="llvm"), notes)
    run = tilefx.runtime.load(path)
    arrays = [t.numpy() for t in inputs]
    return path, lambda: run(*arrays)


def measure(case: Case, runs: int, work: Path) -> tuple[list[str], list[str]]:
    notes: list[str] = []
    inputs = case.inputs
    cache = str(work / "kernels")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = timed("tilefx.optimize", lambda: tilefx.optimize(case.model, inputs, case.recipe), notes)
        compiled = timed("tilefx.compile", lambda: tilefx.compile(pruned, cache_dir=cache), notes)
        artifact_path, artifact = artifact_call(pruned, inputs, work, notes)
        backend = torch.compile(
            case.model, backend="tilefx", options={"recipe": case.recipe, "cache_dir": cache}
        )
        with LoweringLog() as lowered:
            timed("torch.compile(backend='tilefx') first call", lambda: backend(*inputs), notes)
        graphs = "; ".join(lowered.messages) or "no graph compiled"
        notes.append(f"torch.compile(backend='tilefx'), per Dynamo graph: {graphs}")
        inductor = torch.compile(case.model)
        with torch.no_grad():
            timed("torch.compile (inductor) first call", lambda: inductor(*inputs), notes)
    ours = {
        str(w.message).splitlines()[0][:160] for w in caught if issubclass(w.category, tilefx.CoverageWarning)
    }
    notes += [f"warning: {m}" for m in sorted(ours)]
    choices = lowering_choices(compiled)
    notes.append(
        f"tilefx.compile lowered {sum(c.lowered for c in choices)} of {len(choices)} block-sparse layers"
    )
    fns: dict[str, Callable[[], Any]] = {
        "dense torch eager": lambda: case.model(*inputs),
        "pruned, torch eager": lambda: pruned(*inputs),
        "tilefx from torch": lambda: compiled(*inputs),
    }
    fns["standalone artifact"] = artifact
    fns["torch.compile(backend='tilefx')"] = lambda: backend(*inputs)
    fns["torch.compile inductor (dense)"] = lambda: inductor(*inputs)
    with torch.no_grad():
        reference = first_tensor(pruned(*inputs)).float()
        dense = first_tensor(case.model(*inputs)).float()
        errors = {name: max_rel_error(fn(), reference) for name, fn in fns.items()}
    medians = {k: t.median for k, t in interleaved_timings(fns, rounds=runs, shuffle=True).items()}
    base = medians["tilefx from torch"]
    rows = [
        f"| {case.name} | {name} | {ms:.2f} | {ms / base:.2f}x | {errors[name]:.1e} |"
        for name, ms in medians.items()
    ]
    rel = float((reference - dense).abs().max() / dense.abs().max())
    notes.append(
        "artifact round trip in a fresh process that cannot import torch: max rel error "
        f"{error_without_torch(artifact_path, inputs, reference):.1e} vs pruned torch"
    )
    if case.name.startswith("all-MiniLM"):
        notes.append(f"quality: {sentence_cosine(reference, dense, inputs[1]):.3f} mean sentence-embedding cosine "
                     "to the dense model on the batch's 16 sentences (one-shot pruning, no recovery)")  # fmt: skip
    notes.append(
        f"pruned vs dense model (the pruning itself, one-shot, no recovery): max rel error {rel:.2e}"
        + ("" if case.name.startswith("all-MiniLM") else " (random weights)")
    )
    return rows, notes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--models", default="minilm,resnet18,resnet50")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and TVM threads (1: stable ratios on a loaded machine)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "deploy.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    torch.manual_seed(0)
    random.seed(0)
    table = [
        "| model | path | median ms | vs tilefx from torch | max rel error vs pruned torch |",
        "|---|---|---|---|---|",
    ]
    sections = []
    for case in cases(args.models.split(",")):
        with tempfile.TemporaryDirectory() as work:
            rows, notes = measure(case, args.runs, Path(work))
        table += rows
        sections.append(f"**{case.name}** ({case.what}):\n" + "\n".join(f"- {n}" for n in notes))
        print("\n".join(rows), flush=True)
        print("\n".join(notes), flush=True)
        torch._dynamo.reset()
        gc.collect()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    shared = f"Load average at the end (1, 5, 15 min): {load}; on a shared machine other jobs ran alongside."
    body = shared + "\n\n" + "\n".join(table) + "\n\n" + "\n\n".join(sections)
    save_result(args.out, "Deployment paths: eager, tilefx, artifact, torch.compile", body)
    print(body)


if __name__ == "__main__":
    main()
