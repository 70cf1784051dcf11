"""tilefx: prune a PyTorch model, lower it to block-sparse kernels, measure and export it.

  tilefx optimize torchvision.models:resnet18 --input 1x3x224x224 --recipe recipe.toml -o out/
  tilefx optimize tilefx.models:minilm --input input_ids:1x128:int64 \\
      --input attention_mask:1x128:int64 --recipe recipe.toml -o out/
  tilefx compile out/              # lower; says which layers got kernels and why not
  tilefx bench out/                # dense eager vs optimized vs compiled, medians, ratios
  tilefx report out/               # out/report.html with pictures
  tilefx export out/ -o artifact/  # a standalone TVM artifact

Exit status: 0 success; 2 a tilefx error or bad argument (one line on stderr naming it);
1 an unexpected failure (--debug shows the traceback). ``optimize`` saves a directory whose
model.pt is a pickle: loading it runs code, so only give these commands directories you trust.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
import tomllib
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import torch
from tqdm import tqdm

import tilefx
import tilefx.report
from tilefx import saved
from tilefx.errors import CaptureError, OptimizeError, RecipeError
from tilefx.passes.infra import TimingInstrument
from tilefx.report import count_parameters, max_relative_error, pass_table, quantization_summary
from tilefx.timing import interleaved_timings

__all__ = ["main"]

log = logging.getLogger("tilefx.cli")

#: Loggers whose INFO lines explain a result to its user, shown at the default level.
EXPLAINED = "tilefx.passes.prune_channels"

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "float64": torch.float64, "int64": torch.int64, "long": torch.int64,
    "int32": torch.int32, "int": torch.int32, "bool": torch.bool,
}  # fmt: skip


class UsageError(Exception):
    """A bad command-line argument or file, reported as one line and exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"tilefx: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


# ---- inputs -------------------------------------------------------------------------------


def parse_input(spec: str) -> tuple[str, tuple[int, ...], torch.dtype]:
    """``[NAME:]SHAPE[:DTYPE]``, SHAPE like ``1x3x224x224`` (or ``1,3,224,224``), DTYPE float32."""
    parts = spec.split(":")
    if len(parts) == 3:
        name, shape_text, dtype_text = parts
    elif len(parts) == 2 and parts[1] in DTYPES:
        name, shape_text, dtype_text = "", parts[0], parts[1]
    elif len(parts) == 2:
        name, shape_text, dtype_text = parts[0], parts[1], "float32"
    elif len(parts) == 1:
        name, shape_text, dtype_text = "", parts[0], "float32"
    else:
        raise UsageError(f"--input {spec!r}: expected [NAME:]SHAPE[:DTYPE], e.g. input_ids:1x128:int64")
    try:
        shape = tuple(int(v) for v in shape_text.replace(",", "x").split("x"))
    except ValueError:
        raise UsageError(f"--input {spec!r}: shape {shape_text!r} is not integers like 1x3x224x224") from None
    if any(v < 0 for v in shape):
        raise UsageError(f"--input {spec!r}: shape {shape_text!r} has a negative size")
    if dtype_text not in DTYPES:
        raise UsageError(f"--input {spec!r}: unknown dtype {dtype_text!r}; one of {', '.join(DTYPES)}")
    return name, shape, DTYPES[dtype_text]


def example_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random data: floats ~ N(0, 1); a ``*mask*`` input all ones; other integers token ids in [0, 1000)."""
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if "mask" in name or dtype is torch.bool:
        return torch.ones(shape, dtype=dtype)
    return torch.randint(0, 1000, shape, generator=generator, dtype=dtype)


def _load_tensors(path: str, option: str) -> Any:
    """A ``torch.save`` file of tensors, loaded with ``weights_only=True`` (no code runs)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{option} {path}: no such file")
    try:
        return torch.load(file, weights_only=True)
    except Exception as exc:  # a foreign or truncated file can raise anything
        message = " ".join(str(exc).split())[:200]
        raise UsageError(
            f"{option} {path}: cannot load it with torch.load ({type(exc).__name__}: {message})"
        ) from exc


def example_inputs(args: argparse.Namespace) -> tuple[Any, ...]:
    if args.inputs and args.input:
        raise UsageError("give --input or --inputs, not both")
    if args.inputs:
        data = _load_tensors(args.inputs, "--inputs")
        data = (data,) if isinstance(data, torch.Tensor) else data
        if isinstance(data, dict):
            data = tuple(data.values())
        if not isinstance(data, (tuple, list)) or not data:
            raise UsageError(f"--inputs {args.inputs}: expected a tensor or a tuple/list/dict of tensors")
        return tuple(data)
    if not args.input:
        raise UsageError("give the model's inputs: --input SHAPE[:DTYPE] (repeatable) or --inputs FILE.pt")
    specs = [parse_input(spec) for spec in args.input]
    return tuple(example_tensor(name, shape, dtype, seed) for seed, (name, shape, dtype) in enumerate(specs))


def calibration(path: str | None) -> list[Any] | None:
    if path is None:
        return None
    data = _load_tensors(path, "--calibration")
    if not isinstance(data, (list, tuple)) or not all(
        isinstance(b, (list, tuple)) and len(b) == 2 for b in data
    ):
        raise UsageError(
            f"--calibration {path}: expected a list of (inputs, labels) batches (labels may be None)"
        )
    return list(data)


# ---- model and recipe ---------------------------------------------------------------------


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


# ---- progress -----------------------------------------------------------------------------


class Steps:
    """A tqdm bar over a command's steps, naming the one running (on a terminal, not with -q)."""

    def __init__(self, names: Sequence[str], quiet: bool) -> None:
        self._bar = tqdm(
            total=len(names),
            disable=quiet or not sys.stderr.isatty(),
            unit="step",
            file=sys.stderr,
            leave=False,
        )

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self._bar.set_description(name)
        start = time.perf_counter()
        yield
        self._bar.update(1)
        log.info("%s: %.1f s", name, time.perf_counter() - start)

    def close(self) -> None:
        self._bar.close()


# ---- commands -----------------------------------------------------------------------------


def _optimize(args: argparse.Namespace) -> int:
    recipe = _recipe(args.recipe)
    inputs = example_inputs(args)
    batches = calibration(args.calibration)
    steps = Steps(["load model", "capture", "optimize", "check", "save"], args.quiet)
    with steps.step("load model"):
        model = _factory(args.factory)
    with steps.step("capture"):
        dense = tilefx.capture(model, inputs)
    timing = TimingInstrument()
    with steps.step("optimize"):
        start = time.perf_counter()
        optimized = tilefx.optimize(model, inputs, recipe=recipe, calibration=batches, instruments=[timing])
        seconds = time.perf_counter() - start
    with steps.step("check"), torch.no_grad():
        error = max_relative_error(optimized(*inputs), model(*inputs))
    out = Path(args.output)
    with steps.step("save"):
        try:
            saved.save(
                saved.SavedResult(
                    optimized, inputs, dense=dense, timings=tuple(timing.timings), source=args.factory
                ),
                out,
            )
        except OSError as exc:
            raise UsageError(f"-o {out}: cannot write it ({exc.strerror or exc})") from exc
    steps.close()
    _say(args, f"optimized {args.factory} in {seconds:.1f} s\n\n{pass_table(timing.timings)}\n")
    _say(args, f"outputs vs the original: max relative error {error:.2e}")
    _say(args, f"parameters: {count_parameters(model):,} -> {count_parameters(optimized):,}")
    quantized = quantization_summary(optimized)
    if quantized is not None:
        _say(args, quantized)
    _say(args, f"wrote {out}/ (next: tilefx compile {out} | tilefx bench {out} | tilefx report {out})")
    return 0


def _compile_saved(args: argparse.Namespace, result: saved.SavedResult) -> torch.nn.Module:
    options: dict[str, Any] = {}
    if getattr(args, "fallback", None):
        options["fallback"] = args.fallback
    return tilefx.compile(result.optimized, target=args.target, **options)


def _compile(args: argparse.Namespace) -> int:
    from tilefx.lowering.build import lowering_choices  # tvm is imported only by compile commands

    result = saved.load(args.directory)
    steps = Steps(["compile kernels"], args.quiet)
    with steps.step("compile kernels"):
        compiled = _compile_saved(args, result)
    steps.close()
    choices = lowering_choices(compiled) if isinstance(compiled, torch.fx.GraphModule) else ()
    lowered = sum(c.lowered for c in choices)
    _say(
        args,
        f"compiled {args.directory} for {args.target}: {lowered} of {len(choices)} block-sparse layers lowered",
    )
    for choice in choices:
        _say(args, f"  {choice.describe()}")
    with torch.no_grad():
        error = max_relative_error(compiled(*result.example_inputs), result.optimized(*result.example_inputs))
    _say(args, f"outputs vs the optimized model: max relative error {error:.2e}")
    return 0


def _export(args: argparse.Namespace) -> int:
    result = saved.load(args.directory)
    steps = Steps(["export"], args.quiet)
    with steps.step("export"):
        path = tilefx.export(result.optimized, result.example_inputs, args.output, target=args.target)
    steps.close()
    _say(args, f"wrote {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    result = saved.load(args.directory)
    steps = Steps(["report"], args.quiet)
    with steps.step("report"):
        path = tilefx.report.write_report(
            Path(args.directory), result.optimized, result.example_inputs,
            dense=result.dense, timings=list(result.timings), measure=not args.no_measure,
        )  # fmt: skip
    steps.close()
    _say(args, f"wrote {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    result = saved.load(args.directory)
    inputs = result.example_inputs
    candidates: dict[str, Callable[[], object]] = {}
    if result.dense is not None:
        candidates["dense eager"] = lambda: result.dense(*inputs)  # type: ignore[misc]
    candidates["optimized"] = lambda: result.optimized(*inputs)
    if not args.no_compile:
        steps = Steps(["compile kernels"], args.quiet)
        with steps.step("compile kernels"):
            compiled = _compile_saved(args, result)
        steps.close()
        candidates["compiled"] = lambda: compiled(*inputs)
    times = interleaved_timings(candidates, args.repeats, args.warmup, progress=not args.quiet)
    base = times.get("dense eager", times["optimized"]).median
    _say(
        args,
        f"{'model':<12} {'median ms':>10} {'quartiles':>17} {'speedup':>8}   ({args.repeats} interleaved runs each)",
    )
    for name, t in times.items():
        quartiles = f"{t.low:.3f}–{t.high:.3f}"
        _say(args, f"{name:<12} {t.median:>10.3f} {quartiles:>17} {base / t.median:>7.2f}x")
    return 0


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text)


# ---- parser and main ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    common.add_argument("-q", "--quiet", action="store_true", help="errors only: no progress, no report")
    common.add_argument("--debug", action="store_true", help="show the traceback of an unexpected failure")
    raw = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="tilefx", description=__doc__, formatter_class=raw, parents=[common])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    optimize = commands.add_parser(
        "optimize", parents=[common], formatter_class=raw, help="capture, prune and verify a model; save to -o DIR",
        description="Capture MODULE:FACTORY, run the recipe's verified passes, save the result (with its "
        "sparsity metadata) to -o DIR.\n\n  tilefx optimize torchvision.models:resnet18 --input 1x3x224x224 "
        "--recipe r.toml -o out/\n  tilefx optimize tilefx.models:minilm --input input_ids:1x128:int64 "
        "--input attention_mask:1x128:int64 -o out/\n\nRecipe TOML: Recipe fields with [channels], "
        "[connections], [blocks], [recovery], [prior] tables, e.g.\n  [blocks]\n  block = [16, 1]\n  sparsity = 0.8",
    )  # fmt: skip
    optimize.add_argument("factory", help="MODULE:FACTORY, called with no arguments, returning an nn.Module")
    optimize.add_argument("--input", action="append", metavar="[NAME:]SHAPE[:DTYPE]",
                          help="one model input, repeatable, in order: 1x3x224x224, input_ids:1x128:int64; "
                          "random data (ints: token ids < 1000; names with 'mask': ones)")  # fmt: skip
    optimize.add_argument("--input-shape", dest="input", action="append", help=argparse.SUPPRESS)
    optimize.add_argument(
        "--inputs", metavar="FILE.pt", help="torch.save'd example tensor(s): a tensor, tuple or list"
    )
    optimize.add_argument("--calibration", metavar="FILE.pt",
                          help="torch.save'd list of (inputs, labels) batches for taylor/dcp and recovery")  # fmt: skip
    optimize.add_argument(
        "--recipe", metavar="FILE.toml", help="TOML file of Recipe fields (default: exact passes only)"
    )
    optimize.add_argument("-o", "--output", default="tilefx-out", metavar="DIR", help="default: tilefx-out")
    optimize.set_defaults(run=_optimize)

    def saved_command(name: str, summary: str, example: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], formatter_class=raw, help=summary,
                                  description=f"{summary}.\n\n  {example}")  # fmt: skip
        sub.add_argument("directory", metavar="DIR", help="a directory written by `tilefx optimize -o DIR`")
        return sub

    compile_ = saved_command(
        "compile", "lower DIR's sparse layers to TVM kernels and say which", "tilefx compile out/"
    )
    bench = saved_command("bench", "time dense eager vs optimized vs compiled (interleaved medians)",
                          "tilefx bench out/ --repeats 50")  # fmt: skip
    for sub in (compile_, bench):
        sub.add_argument("--target", default="llvm", help="TVM target (default llvm)")
        sub.add_argument("--fallback", choices=("measure", "never"),
                         help="measure: keep a layer dense where its kernel is slower (default); never: always lower")  # fmt: skip
    compile_.set_defaults(run=_compile)
    bench.add_argument("--repeats", type=_positive, default=30, help="timed runs of each (default 30)")
    bench.add_argument("--warmup", type=_positive, default=3, help="untimed runs first (default 3)")
    bench.add_argument("--no-compile", action="store_true", help="skip the compiled model (no TVM)")
    bench.set_defaults(run=_bench)
    export = saved_command(
        "export", "write a standalone TVM artifact of DIR", "tilefx export out/ -o artifact/"
    )
    export.add_argument("-o", "--output", required=True, metavar="PATH", help="the artifact directory")
    export.add_argument("--target", default="llvm", help="TVM target (default llvm)")
    export.set_defaults(run=_export)
    report = saved_command("report", "write DIR/report.html with per-layer pictures", "tilefx report out/")
    report.add_argument("--no-measure", action="store_true", help="skip the latency measurements")
    report.set_defaults(run=_report)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """Warnings (CoverageWarning's explanations) as plain text, without source lines."""
    print(f"tilefx: {category.__name__}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (
        logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.quiet:  # which channel groups were frozen and why: the answer to "why so little pruning"
        logging.getLogger(EXPLAINED).setLevel(min(level, logging.INFO))
    warnings.showwarning = _show_warning
    if args.quiet:
        warnings.simplefilter("ignore")
    try:
        return int(args.run(args))
    except (OptimizeError, UsageError) as exc:
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(exc).split())  # one line: a shell user reads the first line only
        kind = "error" if isinstance(exc, UsageError) else type(exc).__name__
        print(f"tilefx: {kind}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tilefx: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(exc).split())
        print(f"tilefx: unexpected {type(exc).__name__}: {message} (rerun with --debug for the traceback)",
              file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
