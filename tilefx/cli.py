"""``tilefx optimize MODULE:FACTORY``: the optimizer from a compile script or a shell.

    tilefx optimize torchvision.models:resnet50 --input-shape 1,3,224,224 --recipe recipe.toml -o out/

The factory is called with no arguments and must return an ``nn.Module``. The recipe file holds
``Recipe`` fields, with ``[channels]``, ``[connections]`` and ``[blocks]`` tables. Writes ``out/optimized.pt2``
(a ``torch.export`` archive of the optimized model) and prints a report. A bad factory, recipe
file or model is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
import tomllib
from pathlib import Path

import torch

import tilefx
from tilefx.passes.infra import CaptureError, OptimizeError, RecipeError, TimingInstrument
from tilefx.report import count_parameters, max_relative_error, pass_table

__all__ = ["main"]


def _factory(spec: str) -> torch.nn.Module:
    """The model ``MODULE:FACTORY`` builds; every way that can fail is a CaptureError naming ``spec``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CaptureError(f"expected MODULE:FACTORY (e.g. torchvision.models:resnet18), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may raise anything while it imports
        raise CaptureError(
            f"cannot import module {module_name!r} of {spec!r}: {type(exc).__name__}: {exc}"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CaptureError(f"module {module_name!r} has no callable {attr!r} (from {spec!r})")
    try:
        model = factory()
    except Exception as exc:
        raise CaptureError(f"{spec}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"{spec}() returned {type(model).__name__}, not an nn.Module")
    return model.eval()


def _recipe(path: str | None) -> tilefx.Recipe:
    """The recipe in a TOML file; a missing, unreadable or invalid file is a RecipeError naming it."""
    if path is None:
        return tilefx.Recipe()
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise RecipeError(f"recipe file {path}: cannot read it ({exc.strerror or exc})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe file {path} is not valid TOML: {exc}") from exc
    try:
        return tilefx.Recipe.from_dict(data)
    except RecipeError as exc:
        raise RecipeError(f"recipe file {path}: {exc}") from exc


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--input-shape takes comma-separated integers, got {text!r}"
        ) from exc


def _optimize(args: argparse.Namespace) -> int:
    recipe = _recipe(args.recipe)
    model = _factory(args.factory)
    x = torch.randn(*args.input_shape, generator=torch.Generator().manual_seed(0))
    timing = TimingInstrument()
    start = time.perf_counter()
    optimized = tilefx.optimize(model, (x,), recipe=recipe, instruments=[timing])
    print(
        f"optimized {args.factory} in {time.perf_counter() - start:.1f} s\n\n{pass_table(timing.timings)}\n"
    )
    with torch.no_grad():
        print(f"outputs vs the original: max relative error {max_relative_error(optimized(x), model(x)):.2e}")
    print(f"parameters: {count_parameters(model):,} -> {count_parameters(optimized):,}")
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        torch.export.save(torch.export.export(optimized, (x,), strict=False), out / "optimized.pt2")
    except OSError as exc:
        print(f"tilefx: cannot write {out / 'optimized.pt2'}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'optimized.pt2'} (load with torch.export.load(path).module())")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tilefx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    optimize = commands.add_parser("optimize", help="capture, prune and verify a model")
    optimize.add_argument("factory", help="MODULE:FACTORY returning an nn.Module")
    optimize.add_argument("--input-shape", type=_shape, required=True, help="e.g. 1,3,224,224")
    optimize.add_argument("--recipe", help="TOML file of Recipe fields")
    optimize.add_argument("-o", "--output", default="tilefx-out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return _optimize(args)
    except OptimizeError as exc:
        message = " ".join(str(exc).split())  # one line: a shell user reads the first line only
        print(f"tilefx: {type(exc).__name__}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
