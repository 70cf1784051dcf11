"""Recovery under torch.distributed: 2 CPU processes (gloo), DDP, one shard of the batches each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tilefx
from tilefx.passes import recover_sparsity
from tilefx.passes.metadata import BlockSparsity, get_metadata
from tilefx.passes.training.loop import LoopResult

WORLD = 2


class _MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _worker(rank: int, folder: str) -> None:
    """One rank: the same model and recipe everywhere, a checkpoint folder of its own. One-shot
    pruning at step 0, so the distillation loss starts high and recovery must bring it down."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)  # ranks start from different RNG states: DDP must still agree
        generator = torch.Generator().manual_seed(0)
        model = _MLP()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        data = [(torch.randn(8, 16, generator=generator), None) for _ in range(8)]
        results: list[LoopResult] = []

        def recording(*args: Any, **kwargs: Any) -> LoopResult:
            results.append(original(*args, **kwargs))
            return results[-1]

        original = recover_sparsity.train
        recover_sparsity.train = recording  # type: ignore[assignment]
        recovery = tilefx.Recovery(
            steps=16,
            lr=3e-3,
            schedule="oneshot",
            progress=False,
            checkpoint_dir=f"{folder}/rank{rank}",
            checkpoint_every=8,
        )
        recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(8, 1), sparsity=0.5), recovery=recovery)
        gm = tilefx.optimize(model, (data[0][0],), recipe, calibration=data)
        masks = {
            n: r[-1].mask for n, r in get_metadata(gm).params.items() if isinstance(r[-1], BlockSparsity)
        }
        torch.save(
            {"state": gm.state_dict(), "masks": masks, "losses": results[0].losses}, f"{folder}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_two_ranks_agree_on_masks_and_parameters_and_the_loss_falls(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert ranks[0]["masks"].keys() == {"fc1.weight", "fc2.weight"}
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name])
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    losses = ranks[0]["losses"]
    assert losses == ranks[1]["losses"]  # the reported loss is averaged over ranks
    assert sum(losses[-4:]) < sum(losses[:4])
    assert (tmp_path / "rank0" / "checkpoint.pt").exists()
    assert not (tmp_path / "rank1").exists()  # only rank 0 writes checkpoints
