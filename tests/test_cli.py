"""The command line: optimize a factory with a TOML recipe, typed errors become exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tilefx.cli import main


def test_optimize_writes_a_loadable_pruned_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[channels]\nratio = 0.5\n")
    code = main(
        [
            "optimize",
            "tests.models:ConvBN",
            "--input-shape",
            "1,3,8,8",
            "--recipe",
            str(recipe),
            "-o",
            str(tmp_path),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "PruneChannelsPass | yes" in printed and "max relative error" in printed
    model = torch.export.load(tmp_path / "optimized.pt2").module()
    assert model.get_parameter("conv.weight").shape[0] == 4


def test_bad_recipe_is_reported_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[channels]\nratio = 1.5\n")
    assert main(["optimize", "tests.models:ConvBN", "--input-shape", "1,3,8,8", "--recipe", str(recipe)]) == 2
    assert "ratio" in capsys.readouterr().err
