"""VR-PGE under torch.distributed: 2 CPU processes (gloo) share masks and scores and end identical."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tilefx
from tilefx.passes import train_structure_params
from tilefx.passes.criteria.vrpge import StructureSearch

WORLD = 2


class _MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = _MLP().eval()
        generator = torch.Generator().manual_seed(1)
        data = [(torch.randn(8, 8, generator=generator), torch.randint(0, 3, (8,), generator=generator))
                for _ in range(4)]  # fmt: skip
        searches: list[StructureSearch] = []
        original = train_structure_params.search_structure

        def recording(*args: Any, **kwargs: Any) -> StructureSearch:
            searches.append(original(*args, **kwargs))
            return searches[-1]

        train_structure_params.search_structure = recording  # type: ignore[assignment]
        torch.manual_seed(rank)  # ranks start from different RNG states: masks must still agree
        options = tilefx.VRPGEOptions(steps=6, finetune_steps=2)
        recipe = tilefx.Recipe(channels=tilefx.ChannelPruning(ratio=0.5, criterion="vrpge", options=options))
        gm = tilefx.optimize(model, (data[0][0],), recipe, calibration=data)
        torch.save(
            {"state": gm.state_dict(), "scores": searches[0].scores.detach()}, f"{folder}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_two_ranks_end_with_the_same_pruned_model(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert torch.equal(ranks[0]["scores"], ranks[1]["scores"])  # each rank saw other batches
    assert ranks[0]["state"]["fc1.weight"].shape[0] < 16
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
