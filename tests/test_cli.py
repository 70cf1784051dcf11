"""The command line's happy path and the saved directory format it works on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tilefx
import tilefx.report
from tests.models import ConvBN
from tilefx import saved
from tilefx.cli import main, parse_input
from tilefx.passes.metadata import BlockSparsity, get_metadata

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = "[blocks]\nblock = [4, 1]\nsparsity = 0.5\nreorder = 'none'\n"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tilefx.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_input_specs() -> None:
    assert parse_input("1x3x224x224") == ("", (1, 3, 224, 224), torch.float32)
    assert parse_input("1,3,8,8") == ("", (1, 3, 8, 8), torch.float32)
    assert parse_input("input_ids:1x128:int64") == ("input_ids", (1, 128), torch.int64)
    assert parse_input("1x128:int64") == ("", (1, 128), torch.int64)
    assert parse_input("x:2x4") == ("x", (2, 4), torch.float32)


def test_saved_round_trip_keeps_metadata_and_lowers_the_same(tmp_path: Path) -> None:
    pytest.importorskip("tvm")
    model, x = ConvBN().eval(), torch.randn(1, 3, 8, 8)
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(4, 1), sparsity=0.5, reorder="none"))
    optimized = tilefx.optimize(model, (x,), recipe=recipe)
    saved.save(saved.SavedResult(optimized, (x,), dense=tilefx.capture(model, (x,)), source="t"), tmp_path)
    loaded = saved.load(tmp_path)
    assert loaded.recipe == recipe
    before, after = get_metadata(optimized), get_metadata(loaded.optimized)
    assert sorted(before.params) == sorted(after.params)
    for name in before.params:
        (a,), (b,) = before.of(name, BlockSparsity), after.of(name, BlockSparsity)
        assert a.block == b.block and torch.equal(a.mask, b.mask)
    with torch.no_grad():
        torch.testing.assert_close(loaded.optimized(x), optimized(x), rtol=0, atol=0)
        assert loaded.dense is not None
        torch.testing.assert_close(loaded.dense(x), model(x))
    from tilefx.lowering.build import lowering_choices

    direct = tilefx.compile(optimized, fallback="never")
    again = tilefx.compile(loaded.optimized, fallback="never")
    assert [c.lowered for c in lowering_choices(direct)] == [c.lowered for c in lowering_choices(again)]
    assert all(c.lowered for c in lowering_choices(again)) and lowering_choices(again)
    with torch.no_grad():
        torch.testing.assert_close(again(x), direct(x), rtol=1e-5, atol=1e-6)


def test_optimize_compile_bench_through_the_shell(tmp_path: Path) -> None:
    pytest.importorskip("tvm")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(BLOCKS)
    out = tmp_path / "out"
    optimized = cli(
        "optimize",
        "tests.models:ConvBN",
        "--input",
        "x:1x3x8x8:float32",
        "--recipe",
        str(recipe),
        "-o",
        str(out),
    )
    assert optimized.returncode == 0, optimized.stderr
    assert "PruneBlocksPass | yes" in optimized.stdout and (out / "manifest.json").is_file()
    compiled = cli("compile", str(out), "--fallback", "never")
    assert compiled.returncode == 0, compiled.stderr
    assert "2 of 2 block-sparse layers lowered" in compiled.stdout
    bench = cli("bench", str(out), "--repeats", "3", "--warmup", "1", "--fallback", "never")
    assert bench.returncode == 0, bench.stderr
    for name in ("dense eager", "optimized", "compiled"):
        assert name in bench.stdout


def test_token_id_inputs_file_and_quiet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    inputs = tmp_path / "inputs.pt"
    ids = torch.randint(0, 50, (2, 8))
    torch.save((ids, torch.ones(2, 8, dtype=torch.int64)), inputs)
    out = tmp_path / "out"
    assert main(["optimize", "tests.models:tiny_bert", "--inputs", str(inputs), "-q", "-o", str(out)]) == 0
    assert capsys.readouterr().out == ""
    assert torch.equal(saved.load(out).example_inputs[0], ids)


def test_report_writes_html(tmp_path: Path) -> None:
    assert main(["optimize", "tests.models:ConvBN", "--input", "1x3x8x8", "-q", "-o", str(tmp_path)]) == 0
    assert main(["report", str(tmp_path), "--no-measure", "-q"]) == 0
    assert (tmp_path / "report.html").stat().st_size > 0


def test_export_writes_an_artifact(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(BLOCKS)
    out = tmp_path / "out"
    assert (
        main(
            [
                "optimize",
                "tests.models:ConvBN",
                "--input",
                "1x3x8x8",
                "--recipe",
                str(recipe),
                "-q",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert main(["export", str(out), "-o", str(tmp_path / "artifact"), "-q"]) == 0
    assert (tmp_path / "artifact").exists()


def test_bad_recipe_is_reported_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[channels]\nratio = 1.5\n")
    assert main(["optimize", "tests.models:ConvBN", "--input-shape", "1,3,8,8", "--recipe", str(recipe)]) == 2
    assert "ratio" in capsys.readouterr().err
