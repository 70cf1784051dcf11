"""The HTML report renders for block-pruned (TETRIS) and channel-pruned models, offline."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import tilefx
from tilefx.passes.infra.instruments import TimingInstrument
from tilefx.report import write_report


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def _assert_complete(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert page.stat().st_size > 0
    references = re.findall(r'src="([^"]+)"', text)
    assert references, "the report shows no picture"
    for name in references:
        assert "/" not in name and not name.startswith("http")
        assert (page.parent / name).stat().st_size > 0
    for png in page.parent.glob("*.png"):
        assert png.stat().st_size > 0


@pytest.mark.parametrize(
    ("model", "x", "recipe"),
    [
        (_Mlp(), torch.randn(4, 32), tilefx.Recipe(blocks=tilefx.BlockPruning(block=(16, 1), sparsity=0.75))),
        (_Convs(), torch.randn(1, 3, 8, 8), tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5))),
    ],
)
def test_report_writes_html_and_every_picture_it_references(
    tmp_path: Path, model: nn.Module, x: torch.Tensor, recipe: tilefx.Recipe
) -> None:
    timing = TimingInstrument()
    gm = tilefx.optimize(model, (x,), recipe=recipe, instruments=[timing])
    page = write_report(
        tmp_path, gm, (x,), dense=tilefx.capture(model, (x,)), timings=timing.timings, measure=False
    )
    _assert_complete(page)
    text = page.read_text(encoding="utf-8")
    assert "Pass timings" in text and "verification" in text
    if recipe.blocks is not None:
        assert "pattern_0.png" in text


def test_optimize_report_argument_writes_the_report(tmp_path: Path) -> None:
    x = torch.randn(4, 32)
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(16, 1), sparsity=0.75))
    tilefx.optimize(_Mlp(), (x,), recipe=recipe, report=tmp_path / "out")
    _assert_complete(tmp_path / "out" / "report.html")


def test_recovery_loss_history_is_plotted(tmp_path: Path) -> None:
    x = torch.randn(4, 32)
    gm = tilefx.optimize(_Mlp(), (x,), tilefx.Recipe(blocks=tilefx.BlockPruning(block=(16, 1), sparsity=0.5)))
    metadata = tilefx.passes.metadata.get_metadata(gm)
    tilefx.passes.metadata.set_metadata(gm, dataclasses.replace(metadata, recovery_losses=(1.0, 0.5, 0.25)))
    page = write_report(tmp_path, gm, (x,), measure=False)
    assert 'src="recovery.png"' in page.read_text(encoding="utf-8")
    _assert_complete(page)


def test_each_modifying_pass_verification_is_recorded_and_listed(tmp_path: Path) -> None:
    x = torch.randn(4, 32)
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(16, 1), sparsity=0.5))
    gm = tilefx.optimize(_Mlp(), (x,), recipe)
    checks = tilefx.passes.metadata.get_metadata(gm).verification
    pruning = [c for c in checks if c.pass_name == "PruneBlocksPass"]
    assert len(pruning) == 1 and pruning[0].reference == "the masked reference of PruneBlocksPass"
    assert all(0.0 <= c.relative_error <= 1e-5 for c in checks)
    text = write_report(tmp_path, gm, (x,), measure=False).read_text(encoding="utf-8")
    assert "<h2>Verification</h2>" in text and "the masked reference of PruneBlocksPass" in text
