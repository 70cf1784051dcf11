"""A corpus of bad inputs, as a new user writes them: each is one typed error naming the culprit.

Every case asserts the error type (a ``tilefx.OptimizeError`` subclass), that the message names
the offending field, node, input or file, and that the user's model is byte-identical afterwards
(parameters, buffers and each module's training flag). Models are tiny so the corpus runs in
seconds; only the three CLI cases at the end start a process.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import tilefx
from tests.models import ConvBN, randomize_bn
from tilefx.cli import main

X = torch.randn(2, 3, 8, 8)
LABELS = torch.tensor([0, 3])
BLOCKS = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(4, 1), sparsity=0.5, reorder="none"))


def _snapshot(model: object) -> object:
    """Everything of ``model`` a call may not change: tensor bytes (or meta shapes), training flags."""
    if not isinstance(model, nn.Module):
        return model
    tensors = {
        name: (
            tuple(t.shape),
            t.dtype,
            t.device.type,
            None if t.is_meta else t.detach().cpu().numpy().tobytes(),
        )
        for name, t in model.state_dict(keep_vars=True).items()
    }
    return tensors, [(name, m.training) for name, m in model.named_modules()]


class Branchy(nn.Module):
    """A Python branch on a tensor value: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y if float(y.sum()) > 0 else -y


class Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("broken forward")


def _nan_weight() -> nn.Module:
    model = ConvBN().train()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    return model


def _inf_buffer() -> nn.Module:
    model = ConvBN().train()
    model.bn.running_var[1] = float("inf")
    return model


def _optimize(recipe: Any = None, inputs: Any = (X,), **kwargs: Any) -> Callable[[Any], object]:
    return lambda model: tilefx.optimize(model, inputs, recipe=recipe, **kwargs)


def _channels(**options: Any) -> Callable[[Any], object]:
    return lambda model: tilefx.optimize(
        model, (X,), recipe=tilefx.Recipe(channels=tilefx.ChannelPruning(**options))
    )


def _blocks(**options: Any) -> Callable[[Any], object]:
    return lambda model: tilefx.optimize(
        model, (X,), recipe=tilefx.Recipe(blocks=tilefx.BlockPruning(**options))
    )


def _taylor(calibration: Any) -> Callable[[Any], object]:
    recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(criterion="taylor"))
    return lambda model: tilefx.optimize(model, (X,), recipe=recipe, calibration=calibration)


def _from_dict(data: Any) -> Callable[[Any], object]:
    return lambda model: tilefx.optimize(model, (X,), recipe=tilefx.Recipe.from_dict(data))


# (id, model factory, what the user runs on it, error type, text the message must contain)
CASES: list[tuple[str, Callable[[], object], Callable[[Any], object], type[Exception], str]] = [
    # capture: the model and its example inputs
    ("capture/function-as-model", lambda: lambda x: x, _optimize(), tilefx.CaptureError, "function"),
    ("capture/none-as-model", lambda: None, _optimize(), tilefx.CaptureError, "NoneType"),
    (
        "capture/meta-device-model",
        lambda: ConvBN().to("meta"),
        _optimize(),
        tilefx.CaptureError,
        "'conv.weight' is on the meta",
    ),
    ("capture/nan-weight", _nan_weight, _optimize(), tilefx.CaptureError, "'fc.weight' has 1 non-finite"),
    ("capture/inf-buffer", _inf_buffer, _optimize(), tilefx.CaptureError, "'bn.running_var'"),
    (
        "capture/inputs-dict",
        ConvBN,
        _optimize(inputs={"x": X}),
        tilefx.CaptureError,
        "example_inputs must be a tuple",
    ),
    (
        "capture/inputs-string",
        ConvBN,
        _optimize(inputs="x"),
        tilefx.CaptureError,
        "example_inputs must be a tuple",
    ),
    ("capture/inputs-empty", ConvBN, _optimize(inputs=()), tilefx.CaptureError, "cannot capture ConvBN"),
    (
        "capture/inputs-wrong-channels",
        ConvBN,
        _optimize(inputs=(torch.randn(1, 5, 8, 8),)),
        tilefx.CaptureError,
        "models.py",
    ),
    (
        "capture/inputs-integer",
        ConvBN,
        _optimize(inputs=(torch.ones(1, 3, 8, 8, dtype=torch.long),)),
        tilefx.CaptureError,
        "cannot capture ConvBN",
    ),
    (
        "capture/inputs-nan",
        ConvBN,
        _optimize(inputs=(torch.full((1, 3, 8, 8), float("nan")),)),
        tilefx.CaptureError,
        "example_inputs[0] has non-finite",
    ),
    (
        "capture/inputs-meta",
        ConvBN,
        _optimize(inputs=(torch.empty(1, 3, 8, 8, device="meta"),)),
        tilefx.CaptureError,
        "example_inputs[0] is on the meta",
    ),
    (
        "capture/data-dependent-branch",
        Branchy,
        _optimize(inputs=(torch.randn(2, 4),)),
        tilefx.CaptureError,
        "cannot capture Branchy",
    ),
    (
        "capture/forward-raises",
        Raises,
        _optimize(inputs=(torch.randn(2, 4),)),
        tilefx.CaptureError,
        "broken forward",
    ),
    # recipe: fields of the wrong type or range, names that match nothing
    (
        "recipe/ratio-string",
        ConvBN,
        _channels(ratio="0.3"),
        tilefx.RecipeError,
        "ChannelPruning.ratio must be a number",
    ),
    ("recipe/ratio-none", ConvBN, _channels(ratio=None), tilefx.RecipeError, "ChannelPruning.ratio"),
    ("recipe/ratio-bool", ConvBN, _channels(ratio=True), tilefx.RecipeError, "ChannelPruning.ratio"),
    (
        "recipe/round-to-float",
        ConvBN,
        _channels(round_to=2.0),
        tilefx.RecipeError,
        "ChannelPruning.round_to must be an integer",
    ),
    (
        "recipe/protect-string",
        ConvBN,
        _channels(protect="conv"),
        tilefx.RecipeError,
        "ChannelPruning.protect must be a tuple of strings",
    ),
    (
        "recipe/protect-matches-nothing",
        ConvBN,
        _channels(protect=("convv",)),
        tilefx.RecipeError,
        "'convv' matches no parameter of the model; did you mean 'conv'",
    ),
    (
        "recipe/protect-one-typo-of-two",
        ConvBN,
        _channels(protect=("conv", "fc2")),
        tilefx.RecipeError,
        "'fc2' matches no parameter",
    ),
    (
        "recipe/criterion-unknown",
        ConvBN,
        _channels(criterion="magnitude"),
        tilefx.RecipeError,
        "ChannelPruning.criterion",
    ),
    (
        "recipe/sparsity-string",
        ConvBN,
        _blocks(sparsity="0.8"),
        tilefx.RecipeError,
        "BlockPruning.sparsity must be a number",
    ),
    (
        "recipe/block-int",
        ConvBN,
        _blocks(block=16),
        tilefx.RecipeError,
        "BlockPruning.block must be a tuple of 2 integers",
    ),
    ("recipe/block-string-side", ConvBN, _blocks(block=(16, "1")), tilefx.RecipeError, "BlockPruning.block"),
    (
        "recipe/connections-criterion-int",
        ConvBN,
        lambda m: tilefx.ConnectionPruning(criterion=3),
        tilefx.RecipeError,
        "ConnectionPruning.criterion",
    ),
    (
        "recipe/skip-none",
        ConvBN,
        lambda m: tilefx.Recipe(skip=None),
        tilefx.RecipeError,
        "Recipe.skip must be a tuple of strings",
    ),
    (
        "recipe/fold-batchnorm-string",
        ConvBN,
        lambda m: tilefx.Recipe(fold_batchnorm="yes"),
        tilefx.RecipeError,
        "Recipe.fold_batchnorm",
    ),
    (
        "recipe/tolerance-string",
        ConvBN,
        lambda m: tilefx.Recipe(tolerance="1e-5"),
        tilefx.RecipeError,
        "Recipe.tolerance must be a number",
    ),
    (
        "recipe/channels-dict",
        ConvBN,
        lambda m: tilefx.Recipe(channels={"ratoi": 0.3}),
        tilefx.RecipeError,
        "Recipe.channels: unknown option 'ratoi'; did you mean 'ratio'",
    ),
    (
        "recipe/not-a-recipe",
        ConvBN,
        _optimize(recipe={"channels": None}),
        tilefx.RecipeError,
        "recipe must be a tilefx.Recipe",
    ),
    ("recipe/passes-not-passes", ConvBN, _optimize(passes=[3]), tilefx.RecipeError, "passes[0]"),
    (
        "recipe/instruments-not-instruments",
        ConvBN,
        _optimize(instruments=[print]),
        tilefx.RecipeError,
        "instruments[0]",
    ),
    (
        "recipe/dict-block-int",
        ConvBN,
        _from_dict({"blocks": {"block": 16}}),
        tilefx.RecipeError,
        "Recipe.blocks.block must be a tuple of 2 integers",
    ),
    ("recipe/dict-skip-string", ConvBN, _from_dict({"skip": "aten.add"}), tilefx.RecipeError, "Recipe.skip"),
    (
        "recipe/dict-dcp-epsilon-string",
        ConvBN,
        _from_dict({"channels": {"criterion": "dcp", "options": {"epsilon": "x"}}}),
        tilefx.RecipeError,
        "Recipe.channels.options.epsilon must be a number or None",
    ),
    (
        "recipe/dict-dcp-solver-lr-string",
        ConvBN,
        _from_dict({"channels": {"criterion": "dcp", "options": {"solver": {"lr": "fast"}}}}),
        tilefx.RecipeError,
        "Recipe.channels.options.solver.lr must be a number",
    ),
    (
        "recipe/dict-not-a-table",
        ConvBN,
        _from_dict(["channels"]),
        tilefx.RecipeError,
        "table of Recipe fields",
    ),
    (
        "recipe/dict-section-not-a-table",
        ConvBN,
        _from_dict({"channels": 0.3}),
        tilefx.RecipeError,
        "Recipe.channels must be a table",
    ),
    (
        "recipe/indivisible-block-raise",
        ConvBN,
        _optimize(
            passes=[
                tilefx.passes.prune_blocks.PruneBlocksPass(block=(16, 1), sparsity=0.5, indivisible="raise")
            ]
        ),
        tilefx.RecipeError,
        "does not divide conv.weight",
    ),
    # calibration data for the criteria that learn from it
    (
        "calibration/missing",
        ConvBN,
        _taylor(None),
        tilefx.RecipeError,
        'criterion="taylor") needs calibration data',
    ),
    ("calibration/a-tensor", ConvBN, _taylor(X), tilefx.RecipeError, "calibration must be an iterable"),
    (
        "calibration/triples",
        ConvBN,
        _taylor([(X, LABELS, 1)]),
        tilefx.RecipeError,
        "calibration batch 0 must be a pair",
    ),
    ("calibration/empty", ConvBN, _taylor([]), tilefx.RecipeError, "yielded no"),
    (
        "calibration/two-inputs-for-one",
        ConvBN,
        _taylor([((X, X), LABELS)]),
        tilefx.RecipeError,
        "calibration batch 0 has 2 model input(s)",
    ),
    (
        "calibration/wrong-rank",
        ConvBN,
        _taylor([(torch.randn(2, 3, 8), LABELS)]),
        tilefx.RecipeError,
        "calibration batch 0, input 0",
    ),
    (
        "calibration/integer-inputs",
        ConvBN,
        _taylor([(torch.ones(2, 3, 8, 8, dtype=torch.long), LABELS)]),
        tilefx.RecipeError,
        "calibration batch 0, input 0",
    ),
    (
        "calibration/nan-inputs",
        ConvBN,
        _taylor([(torch.full((2, 3, 8, 8), float("nan")), LABELS)]),
        tilefx.RecipeError,
        "calibration batch 0, input 0 has non-finite",
    ),
    (
        "calibration/label-out-of-range",
        ConvBN,
        _taylor([(X, torch.tensor([0, 9]))]),
        tilefx.PassError,
        "PruneChannelsPass",
    ),
    (
        "calibration/dcp-missing",
        ConvBN,
        _channels(criterion="dcp"),
        tilefx.RecipeError,
        'criterion="dcp") needs calibration data',
    ),
    (
        "quantize/unknown-format",
        ConvBN,
        lambda m: tilefx.Recipe(quantize=tilefx.Quantization(format="int4")),  # type: ignore[arg-type]
        tilefx.RecipeError,
        "Quantization.format must be one of 'int8', 'bf16'; got 'int4'",
    ),
    (
        "quantize/keep-typo",
        ConvBN,
        lambda m: tilefx.optimize(m, (X,), tilefx.Recipe(quantize=tilefx.Quantization(keep=("fcc",)))),
        tilefx.RecipeError,
        "Quantization.keep: 'fcc' matches no parameter of the model; did you mean 'fc'?",
    ),
    (
        "quantize/static-without-calibration",
        ConvBN,
        lambda m: tilefx.optimize(m, (X,), tilefx.Recipe(quantize=tilefx.Quantization(scheme="static"))),
        tilefx.RecipeError,
        'Quantization(format="int8", scheme="static") needs calibration data',
    ),
    (
        "quantize/tolerance-without-calibration",
        ConvBN,
        lambda m: tilefx.optimize(m, (X,), tilefx.Recipe(quantize=tilefx.Quantization(tolerance=0.01))),
        tilefx.RecipeError,
        "tolerance=0.01) needs calibration data",
    ),
    (
        "quantize/bf16-static",
        ConvBN,
        lambda m: tilefx.Recipe(quantize=tilefx.Quantization(format="bf16", scheme="static")),
        tilefx.RecipeError,
        'scheme="static" is for int8 activations',
    ),
    (
        "quantize/toml-wrong-type",
        ConvBN,
        lambda m: tilefx.Recipe.from_dict({"quantize": {"per_channel": "yes"}}),
        tilefx.RecipeError,
        "Recipe.quantize.per_channel must be True or False",
    ),
]


@pytest.mark.parametrize(
    ("make", "call", "error", "names"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_a_typed_error_naming_it_and_the_model_is_untouched(
    make: Callable[[], object], call: Callable[[Any], object], error: type[Exception], names: str
) -> None:
    model = make()
    if isinstance(model, nn.Module):
        model.train()  # capture runs the model in eval mode and must restore every flag
    before = _snapshot(model)
    with pytest.raises(error) as info:
        call(model)
    assert isinstance(info.value, tilefx.OptimizeError)
    assert names in str(info.value)
    assert _snapshot(model) == before


@pytest.fixture(scope="module")
def pruned() -> torch.fx.GraphModule:
    """A block-pruned graph, the input ``compile`` expects; the cases below must leave it as it is."""
    return tilefx.optimize(randomize_bn(ConvBN(bias=True)).eval(), (X,), recipe=BLOCKS)


COMPILE_CASES: list[tuple[str, Callable[[Any], object], type[Exception], str]] = [
    (
        "compile/plain-module-without-inputs",
        lambda gm: tilefx.compile(ConvBN()),
        tilefx.LoweringError,
        "got ConvBN (a torch.nn.Module) without example_inputs; pass example_inputs=(x,)",
    ),
    ("compile/function", lambda gm: tilefx.compile(lambda x: x), tilefx.LoweringError, "got function"),
    ("compile/none", lambda gm: tilefx.compile(None), tilefx.LoweringError, "got NoneType"),
    (
        "compile/unknown-option",
        lambda gm: tilefx.compile(gm, fallbak="never"),
        tilefx.RecipeError,
        "unknown option 'fallbak'; did you mean 'fallback'",
    ),
    (
        "compile/unknown-option-far",
        lambda gm: tilefx.compile(gm, threads=4),
        tilefx.RecipeError,
        "unknown option 'threads'; options: cache_dir",
    ),
    (
        "compile/fallback-unknown",
        lambda gm: tilefx.compile(gm, fallback="sometimes"),
        tilefx.RecipeError,
        "unknown fallback 'sometimes'",
    ),
    (
        "compile/fuse-activations-string",
        lambda gm: tilefx.compile(gm, fuse_activations="yes"),
        tilefx.RecipeError,
        "fuse_activations must be True or False",
    ),
    (
        "compile/cache-dir-int",
        lambda gm: tilefx.compile(gm, cache_dir=3),
        tilefx.RecipeError,
        "cache_dir must be a path",
    ),
    (
        "target/unknown-name",
        lambda gm: tilefx.compile(gm, target="metal"),
        tilefx.LoweringError,
        "unknown target 'metal'",
    ),
    ("target/not-a-target", lambda gm: tilefx.compile(gm, target=3), tilefx.LoweringError, "got 3"),
    (
        "target/dict-without-kind",
        lambda gm: tilefx.compile(gm, target={"mcpu": "native"}),
        tilefx.LoweringError,
        "unknown target",
    ),
]
_NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there: cuda compiles")
CUDA_CASES = [
    (
        "target/cuda-without-gpu",
        lambda gm: tilefx.compile(gm, target="cuda"),
        tilefx.LoweringError,
        "target 'cuda': torch sees no CUDA device",
    ),
    (
        "target/cuda-dict-without-gpu",
        lambda gm: tilefx.compile(gm, target={"kind": "cuda"}),
        tilefx.LoweringError,
        "torch sees no CUDA device",
    ),
    (
        "target/cuda-without-gpu-module-to-capture",
        lambda gm: tilefx.compile(ConvBN(), (X,), target="cuda"),
        tilefx.LoweringError,
        "torch sees no CUDA device",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "names"),
    [c[1:] for c in COMPILE_CASES] + [pytest.param(*c[1:], marks=_NO_GPU) for c in CUDA_CASES],
    ids=[c[0] for c in COMPILE_CASES + CUDA_CASES],
)
def test_bad_compile_input_is_a_typed_error_before_anything_compiles(
    pruned: torch.fx.GraphModule, call: Callable[[Any], object], error: type[Exception], names: str
) -> None:
    """Options are a RecipeError (as in optimize), the model and the target a LoweringError."""
    before = _snapshot(pruned)
    with pytest.raises(error) as info:
        call(pruned)
    assert isinstance(info.value, tilefx.OptimizeError)
    assert names in str(info.value)
    assert _snapshot(pruned) == before
    assert "lowering_choices" not in pruned.meta


def _cli(tmp_path: Path, *args: str, recipe: str | None = None) -> list[str]:
    argv = ["optimize", *args]
    if recipe is not None:
        path = tmp_path / "recipe.toml"
        path.write_text(recipe)
        argv += ["--recipe", str(path)]
    return [*argv, "--input-shape", "1,3,8,8", "-o", str(tmp_path / "out")]


CLI_CASES: list[tuple[str, list[str], str | None, str]] = [
    (
        "cli/module-missing",
        ["no_such_module_tilefx:build"],
        None,
        "cannot import module 'no_such_module_tilefx'",
    ),
    ("cli/factory-missing", ["tests.models:NoSuchModel"], None, "has no callable 'NoSuchModel'"),
    ("cli/no-colon", ["tests.models.ConvBN"], None, "expected MODULE:FACTORY"),
    (
        "cli/factory-needs-arguments",
        ["tests.models:randomize_bn"],
        None,
        "tests.models:randomize_bn() raised TypeError",
    ),
    ("cli/factory-returns-no-module", ["tests.models:informative_data"], None, "not an nn.Module"),
    ("cli/recipe-broken-toml", ["tests.models:ConvBN"], "[channels\nratio = 0.3\n", "is not valid TOML"),
    ("cli/recipe-unknown-key", ["tests.models:ConvBN"], "[channels]\nratoi = 0.3\n", "did you mean 'ratio'"),
    (
        "cli/recipe-wrong-type",
        ["tests.models:ConvBN"],
        '[channels]\nratio = "0.3"\n',
        "Recipe.channels.ratio must be a number",
    ),
    (
        "cli/recipe-protect-typo",
        ["tests.models:ConvBN"],
        '[channels]\nprotect = ["convv"]\n',
        "'convv' matches no parameter",
    ),
]


@pytest.mark.parametrize(
    ("args", "recipe", "names"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_cli_reports_a_bad_input_in_one_line_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], recipe: str | None, names: str
) -> None:
    assert main(_cli(tmp_path, *args, recipe=recipe)) == 2
    err = capsys.readouterr().err.strip()
    assert names in err and len(err.splitlines()) == 1 and err.startswith("tilefx: ")
    assert not (tmp_path / "out").exists()


def test_cli_missing_recipe_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert (
        main(["optimize", "tests.models:ConvBN", "--input-shape", "1,3,8,8", "--recipe", str(missing)]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert f"recipe file {missing}: cannot read it" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["no_such_module_tilefx:build", "--input-shape", "1,3"], "no_such_module_tilefx"),
        (["tests.models:ConvBN", "--input-shape", "1,3,8,8", "--recipe", "{broken}"], "broken.toml"),
        (["tests.models:ConvBN", "--input-shape", "1,3,8,8", "--recipe", "{missing}"], "missing.toml"),
    ],
    ids=["cli-process/module-missing", "cli-process/broken-toml", "cli-process/recipe-missing"],
)
def test_cli_process_exits_2_without_a_traceback(tmp_path: Path, args: list[str], names: str) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[blocks]\nblock = [16, 1\n")
    paths = {"{broken}": str(broken), "{missing}": str(tmp_path / "missing.toml")}
    command = [sys.executable, "-m", "tilefx.cli", "optimize", *[paths.get(a, a) for a in args]]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, cwd=root)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and names in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
