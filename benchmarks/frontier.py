"""The quality–speed frontier of all-MiniLM-L6-v2 (real weights): tilefx against dense fp32 torch and
torch's one-line dynamic int8, in one run, on one machine.

    .venv/bin/python benchmarks/frontier.py --out benchmarks/results/frontier_minilm.md
    .venv/bin/python benchmarks/frontier.py --quick          # three rows, a few minutes

Rows: dense fp32 torch; ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, qint8)``;
tilefx int8 and bf16 (``Recipe(quantize=...)``); tilefx uniform 16×1 blocks at 50% and 80%
(layer-wise reconstruction on the calibration text; 80% then distils with a held-out check); and
``Recipe(speedup=s)`` for each target. Every tilefx model is optimized on **mixed** calibration text
(Python's docs and general English, ``tilefx.corpus.calibration_sentences``) and compiled.

Columns, each model in the same process:
- quality on three held-out sets no calibration reads — in-domain (Python docs), everyday English
  (WordNet's examples), news (Lee et al.): mean cosine of the sentence embeddings to the dense
  model's, and the everyday set's nearest-neighbour agreement;
- speed: every model timed on the same 16 sentences × 32 tokens in one interleaved session
  (``tilefx.timing``: medians and quartiles), as a ratio over dense fp32 torch;
- optimize + compile wall time.

``--cnn`` adds a CNN trained here on scikit-learn's digits (8×8) under ``Recipe(speedup=...)``
(test accuracy and speed). ``--plot`` writes the quality–speed picture. Never imported by tests.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import tilefx
from tilefx.corpus import calibration_sentences, english_sentences, out_of_domain_sentences
from tilefx.models import SentenceEmbedder
from tilefx.passes.search.space import SpeedSearch
from tilefx.report import embedding_quality
from tilefx.timing import Timing, interleaved_timings
from tilefx.zoo import load_minilm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import save_result  # noqa: E402

BATCH, LENGTH = 16, 32


@dataclass
class Row:
    name: str
    model: Callable[..., torch.Tensor]
    seconds: float = float("nan")
    quality: dict[str, tuple[float, float]] | None = None
    timing: Timing | None = None
    note: str = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="1.5,2,2.5,3", help="Recipe(speedup=...) values")
    parser.add_argument("--quick", action="store_true", help="dense, torch int8, tilefx int8 only")
    parser.add_argument("--calibration", type=int, default=32, help="calibration batches of 16 sentences")
    parser.add_argument("--distill-steps", type=int, default=600, help="steps for the 80%% row")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
    parser.add_argument("--cnn", action="store_true", help="add the digits CNN rows")
    parser.add_argument("--plot", type=Path, default=None, help="write the quality-speed picture here")
    parser.add_argument("--out", type=Path, default=None, help="write the table here (markdown)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=tilefx.CoverageWarning)
    torch.manual_seed(0)

    minilm = load_minilm()
    dense = SentenceEmbedder(minilm.model).eval()
    check = SpeedSearch().check_batches
    text = calibration_sentences("mixed")[: BATCH * (args.calibration + check)]
    calibration = [(batch, None) for batch in minilm.batches(text, BATCH, LENGTH)]
    example = calibration[0][0]
    sets = {"in-domain": english_sentences()[1], **out_of_domain_sentences()}
    evaluation = {name: minilm.batches(sentences, BATCH, LENGTH) for name, sentences in sets.items()}
    timed_input = evaluation["in-domain"][0]

    rows = [Row("dense fp32 torch", dense), Row("torch dynamic int8 (quantize_dynamic)", _torch_int8(dense))]
    recipes: list[tuple[str, tilefx.Recipe]] = [
        ("tilefx int8", tilefx.Recipe(quantize=tilefx.Quantization()))
    ]
    if not args.quick:
        recipes += [
            ("tilefx bf16", tilefx.Recipe(quantize=tilefx.Quantization(format="bf16"))),
            ("tilefx 16×1 50%, reconstructed", _blocks(0.5, 0, args.calibration)),
            (
                f"tilefx 16×1 80%, reconstructed + {args.distill_steps} steps",
                _blocks(0.8, args.distill_steps, args.calibration),
            ),
        ]
        for target in (float(t) for t in args.targets.split(",")):
            search = SpeedSearch(calibration_batches=args.calibration, progress=False)
            recipes.append((f"tilefx speedup={target:g}", tilefx.Recipe(speedup=target, search=search)))
    for name, recipe in recipes:
        start = time.perf_counter()
        optimized = tilefx.optimize(dense, example, recipe, calibration=calibration)
        compiled = tilefx.compile(optimized)
        row = Row(name, compiled, time.perf_counter() - start)
        searched = optimized.meta.get("speed_search")
        if searched is not None:
            row.note = f"measured in the search: {', '.join(f'{m:.2f}×' for m in searched.measured)}"
        rows.append(row)
        print(f"{name}: {row.seconds:.0f} s", file=sys.stderr)

    reference = references(dense, evaluation)
    for row in rows:
        row.quality = quality(reference, row.model, evaluation)
    timings = interleaved_timings(
        {row.name: _call(row.model, timed_input) for row in rows},
        rounds=args.rounds,
        warmup=3,
        burst=2,
        shuffle=True,
    )
    for row in rows:
        row.timing = timings[row.name]
    body = _table(rows)
    if args.cnn:
        body += "\n\n" + _cnn_rows(args)
    print(body)
    if args.plot is not None:
        _plot(rows, args.plot)
    if args.out is not None:
        save_result(args.out, "Quality–speed frontier, all-MiniLM-L6-v2", body)


def _blocks(sparsity: float, steps: int, batches: int) -> tilefx.Recipe:
    recovery = tilefx.Recovery(
        schedule="oneshot", reconstruct=batches, steps=steps, lr=1e-3, warmup=0.0, decay="linear",
        output_loss="pooled", check_batches=4 if steps else 0, progress=False,
    )  # fmt: skip
    return tilefx.Recipe(blocks=tilefx.BlockPruning(block=(16, 1), sparsity=sparsity), recovery=recovery)


def _torch_int8(model: nn.Module) -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def _call(
    model: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, torch.Tensor]
) -> Callable[[], object]:
    return lambda: model(*inputs)


def references(dense: nn.Module, sets: Mapping[str, Sequence[Any]]) -> dict[str, torch.Tensor]:
    """The dense model's embeddings of every set, computed once for all rows."""
    with torch.no_grad():
        return {name: torch.cat([dense(*b) for b in batches]) for name, batches in sets.items()}


def quality(
    reference: Mapping[str, torch.Tensor],
    model: Callable[..., torch.Tensor],
    sets: Mapping[str, Sequence[Any]],
) -> dict[str, tuple[float, float]]:
    """Cosine to the dense embeddings and nearest-neighbour agreement, per set."""
    out = {}
    with torch.no_grad():
        for name, batches in sets.items():
            ours = torch.cat([model(*b) for b in batches])
            out[name] = embedding_quality(reference[name], ours)
    return out


def _table(rows: Sequence[Row]) -> str:
    base = rows[0].timing.median if rows[0].timing else float("nan")
    torch_int8 = rows[1].timing.median if rows[1].timing else float("nan")
    lines = [
        "| model | in-domain cos | everyday cos | news cos | everyday NN | ms (quartiles) | vs dense fp32 | vs torch int8 | optimize+compile s | |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        assert row.quality is not None and row.timing is not None
        q = row.quality
        t = row.timing
        lines.append(
            f"| {row.name} | {q['in-domain'][0]:.3f} | {q['everyday'][0]:.3f} | {q['news'][0]:.3f} | "
            f"{q['everyday'][1]:.3f} | {t.median:.1f} ({t.low:.1f}–{t.high:.1f}) | {base / t.median:.2f}× | "
            f"{torch_int8 / t.median:.2f}× | {row.seconds:.0f} | {row.note} |"
        )
    return "\n".join(lines)


def _plot(rows: Sequence[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0].timing.median  # type: ignore[union-attr]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        assert row.quality is not None and row.timing is not None
        worst = min(v[0] for v in row.quality.values())
        speed = base / row.timing.median
        colour = (
            "tab:red"
            if row.name.startswith("torch")
            else "tab:blue"
            if row.name.startswith("tilefx")
            else "black"
        )
        ax.scatter(speed, worst, color=colour)
        ax.annotate(
            row.name.replace("tilefx ", ""),
            (speed, worst),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.axhline(0.95, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("speed-up over dense fp32 torch (compiled, measured)")
    ax.set_ylabel("worst cosine to dense over in-domain, everyday, news")
    ax.set_title("all-MiniLM-L6-v2: quality vs speed (one run, one machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cnn_rows(args: argparse.Namespace) -> str:
    """A CNN trained here on digits; Recipe(speedup=...) on it: test accuracy and speed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=generator)
    train, test = order[:1400], order[1400:]
    model = _train_cnn(x[train], y[train])
    batches = [(x[train][i : i + 64], None) for i in range(0, 1400 - 63, 64)]
    example = (x[test][:64],)
    lines = [
        "| digits CNN | test accuracy | ms (quartiles) | vs dense | optimize+compile s | measured in the search |",
        "|---|---|---|---|---|---|",
    ]
    models: dict[str, tuple[Callable[..., torch.Tensor], float, str]] = {"dense fp32 torch": (model, 0.0, "")}
    for target in (1.5, 2.0):
        start = time.perf_counter()
        search = SpeedSearch(calibration_batches=12, check_batches=4, progress=False)
        optimized = tilefx.optimize(
            model, example, tilefx.Recipe(speedup=target, search=search), calibration=batches
        )
        compiled = tilefx.compile(optimized)
        measured = ", ".join(f"{m:.2f}×" for m in optimized.meta["speed_search"].measured)
        models[f"tilefx speedup={target:g}"] = (compiled, time.perf_counter() - start, measured)
    timings = interleaved_timings(
        {k: _call1(v[0], example[0]) for k, v in models.items()}, rounds=args.rounds, warmup=3, burst=2
    )
    base = timings["dense fp32 torch"].median
    for name, (m, seconds, note) in models.items():
        with torch.no_grad():
            accuracy = float((m(x[test][:384]).argmax(1) == y[test][:384]).float().mean())
        t = timings[name]
        lines.append(
            f"| {name} | {accuracy:.3f} | {t.median:.2f} ({t.low:.2f}–{t.high:.2f}) | {base / t.median:.2f}× | {seconds:.0f} | {note} |"
        )
    return "\n".join(lines)


def _call1(model: Callable[..., torch.Tensor], x: torch.Tensor) -> Callable[[], object]:
    return lambda: model(x)


def _train_cnn(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(8):
        for i in range(0, len(x), 64):
            loss = nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


if __name__ == "__main__":
    main()
