"""``Recipe(speedup=s)`` on torchvision's ResNet-50: the compiled speed-up it measures against
dense fp32 torch for each target, in one interleaved run.

    .venv/bin/python benchmarks/speed_targets_resnet50.py --out benchmarks/results/speed_targets_resnet50.md

The weights are torchvision's architecture at random initialisation with batch-norm statistics
randomised (no pretrained weights ship offline), so this measures what the search reaches in
speed, not accuracy; the relative output error to the dense model is printed so that a choice
which keeps nothing would show. Calibration: random images (the search reads activations, and
with random weights no image is more real than another). The search's space on a CNN is channels
(every residual block's inner widths), timed dense; convolutions take no int8 or block options yet.
The residual stream is not a unit (many layers read it), so keeping half of every inner width
reaches only about 1.6x; ``--keeps`` therefore goes down to a quarter by default (measured with
the default keeps, 1.0-0.5: 1.67x for speedup=1.5, and 1.68-1.70x for 2, beyond reach).
Never imported by tests.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

import tilefx
from tilefx.demo import randomize_batchnorm
from tilefx.passes.search.space import SpeedSearch
from tilefx.timing import interleaved_timings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import save_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="1.5,2,2.5")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--keeps",
        default="1,0.75,0.5,0.375,0.25",
        help="SpeedSearch.keeps: fractions of a bottleneck's inner channels the search may keep",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=tilefx.CoverageWarning)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    randomize_batchnorm(model)
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(args.batch, 3, 224, 224, generator=generator) for _ in range(10)]
    calibration = [((x,), None) for x in images]
    example = (images[0],)
    keeps = tuple(float(k) for k in args.keeps.split(","))
    search = SpeedSearch(keeps=keeps, calibration_batches=8, check_batches=2, progress=False)
    models: dict[str, torch.nn.Module] = {"dense fp32 torch": model}
    notes: dict[str, str] = {"dense fp32 torch": ""}
    for target in (float(t) for t in args.targets.split(",")):
        start = time.perf_counter()
        optimized = tilefx.optimize(
            model, example, tilefx.Recipe(speedup=target, search=search), calibration=calibration
        )
        compiled = tilefx.compile(optimized)
        report = optimized.meta["speed_search"]
        name = f"tilefx speedup={target:g}"
        models[name] = compiled
        notes[name] = f"{time.perf_counter() - start:.0f} | {', '.join(f'{m:.2f}×' for m in report.measured)}"
        print(f"{name}: {notes[name]}", file=sys.stderr)
    x = torch.randn(args.batch, 3, 224, 224, generator=generator)
    timings = interleaved_timings(
        {name: _call(m, x) for name, m in models.items()}, rounds=args.rounds, warmup=3, burst=2
    )
    base = timings["dense fp32 torch"].median
    with torch.no_grad():
        reference = model(x)
        errors = {n: float((m(x) - reference).norm() / reference.norm()) for n, m in models.items()}
    lines = [
        f"ResNet-50, batch {args.batch}, 224×224, random weights (speed only); SpeedSearch(keeps={keeps})",
        "",
        "| model | ms (quartiles) | vs dense fp32 | of target | relative output error | optimize+compile s | measured in the search |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in models:
        t = timings[name]
        target = float(name.split("=")[1]) if "=" in name else 1.0
        seconds_and_search = notes[name] or "– | –"
        lines.append(
            f"| {name} | {t.median:.1f} ({t.low:.1f}–{t.high:.1f}) | {base / t.median:.2f}× | "
            f"{base / t.median / target:.2f} | {errors[name]:.3f} | {seconds_and_search} |"
        )
    body = "\n".join(lines)
    print(body)
    if args.out is not None:
        save_result(args.out, "Recipe(speedup=...) on ResNet-50", body)


def _call(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    return lambda: model(x)


if __name__ == "__main__":
    main()
