"""The block-sparse recipe end to end: TETRIS orders folded exactly, then blocks pruned (masked)."""

from __future__ import annotations

import pytest
import torch

import tilefx
from tests.models import randomize_bn, tiny_bert
from tests.passes.test_prune_channels import Residual
from tilefx.passes.metadata import BlockSparsity, Permutation, get_metadata


def _kept_l1(gm: torch.fx.GraphModule, names: list[str]) -> float:
    return sum(float(gm.get_parameter(n).abs().sum()) for n in names)


def _names(gm: torch.fx.GraphModule) -> list[str]:
    return [
        n
        for n, records in get_metadata(gm).params.items()
        if any(isinstance(r, BlockSparsity) for r in records)
    ]


class Planted(torch.nn.Module):
    """An MLP whose hidden units were shuffled out of a block structure: reordering recovers it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)
        big = torch.zeros(32, 16)
        for b in range(8):  # 4x4 blocks of large weights on a block diagonal-ish pattern
            big[4 * b : 4 * b + 4, 4 * (b % 4) : 4 * (b % 4) + 4] = 1.0
        shuffle = torch.randperm(32, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            self.fc1.weight.copy_((big + 0.01 * torch.rand(32, 16))[shuffle])
            self.fc2.weight.copy_(0.01 * torch.rand(8, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize(
    ("make", "shape", "block"),
    [(Planted, (3, 16), (4, 4)), (Residual, (2, 3, 8, 8), (2, 2))],
    ids=["planted", "residual"],
)
def test_tetris_recipe_never_keeps_less_than_naive_block_pruning(
    make: object, shape: tuple[int, ...], block: tuple[int, int]
) -> None:
    model = randomize_bn(make()).eval()  # type: ignore[operator]
    x = torch.randn(*shape)
    tetris = tilefx.optimize(
        model, (x,), recipe=tilefx.Recipe(blocks=tilefx.BlockPruning(block=block, sparsity=0.75))
    )
    naive = tilefx.optimize(
        model,
        (x,),
        recipe=tilefx.Recipe(blocks=tilefx.BlockPruning(block=block, sparsity=0.75, reorder="none")),
    )
    names = _names(naive)
    assert names and sorted(_names(tetris)) == sorted(names)
    assert _kept_l1(tetris, names) >= _kept_l1(naive, names) - 1e-6


def test_tetris_recipe_recovers_planted_blocks_by_folding_a_permutation() -> None:
    x = torch.randn(3, 16)
    planted = tilefx.optimize(
        Planted().eval(), (x,), recipe=tilefx.Recipe(blocks=tilefx.BlockPruning(block=(4, 4), sparsity=0.75))
    )
    assert float(planted.get_parameter("fc1.weight").abs().sum()) >= 0.99 * 8 * 16  # every planted block kept
    assert get_metadata(planted).of("fc1.weight", Permutation)
    assert get_metadata(planted).of("fc2.weight", Permutation)  # folded into the consumer too


def test_tetris_recipe_on_a_bert_layer_is_verified_and_sparse() -> None:
    model = tiny_bert(heads=2)
    ids = torch.randint(0, 50, (2, 7))
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(8, 1), sparsity=0.5))
    gm = tilefx.optimize(model, (ids,), recipe=recipe)
    records = [r for rs in get_metadata(gm).params.values() for r in rs if isinstance(r, BlockSparsity)]
    assert records and all(abs(r.sparsity - 0.5) < 1e-9 for r in records)


def test_connections_then_blocks_compose() -> None:
    model = randomize_bn(Residual()).eval()
    x = torch.randn(2, 3, 8, 8)
    recipe = tilefx.Recipe(
        connections=tilefx.ConnectionPruning(sparsity=0.5),
        blocks=tilefx.BlockPruning(block=(2, 2), sparsity=0.5),
    )
    gm = tilefx.optimize(model, (x,), recipe=recipe)
    assert _names(gm)
