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
from tilefx.passes.training.calibration import Calibration
from tilefx.passes.training.gradual_pruning import GradualBlockPruning, MaskedWeight
from tilefx.passes.training.loop import LoopOptions, LoopResult, train
from tilefx.passes.training.sparsity_schedule import SparsitySchedule

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


class _RankOneDisagrees(GradualBlockPruning):
    """Rank 1 proposes other masks than rank 0 (rolled by one block): the broadcast must win."""

    overruled = 0

    def _select(self, w: MaskedWeight, sparsity: float) -> torch.Tensor:
        keep = super()._select(w, sparsity)
        if dist.get_rank() == 1 and sparsity > 0:
            proposal = torch.roll(keep, 1)
            self.overruled += int(not torch.equal(proposal, keep))
            return proposal
        return keep


def _gradual_worker(rank: int, folder: str) -> None:
    """A gradual schedule on the loop directly (masks re-selected during DDP training), then a
    ``distributed=False`` run on rank-specific data."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = _MLP()
        generator = torch.Generator().manual_seed(0)
        data = Calibration([(torch.randn(8, 16, generator=generator), None) for _ in range(8)])

        def loss(m: torch.nn.Module, inputs: tuple[torch.Tensor, ...], labels: None) -> torch.Tensor:
            return (m(*inputs) - inputs[0][:, :8]).pow(2).mean()

        weights = [MaskedWeight(n, model.get_parameter(n), (8, 1), 0.5) for n in ("fc1.weight", "fc2.weight")]
        pruning = _RankOneDisagrees(weights, SparsitySchedule(0.5, end=6, every=2), "magnitude")
        options = LoopOptions(steps=10, lr=1e-2, progress=False)
        losses = train(model, loss, data, options, [pruning]).losses
        state = {k: v.clone() for k, v in model.state_dict().items()}
        local_data = Calibration(
            [(torch.randn(8, 16, generator=torch.Generator().manual_seed(rank + 1)), None)]
        )
        train(model, loss, local_data, LoopOptions(steps=2, lr=1e-2, progress=False, distributed=False))
        torch.save(
            {
                "state": state,
                "masks": pruning.masks,
                "losses": losses,
                "overruled": pruning.overruled,
                "local": model.state_dict(),
            },
            f"{folder}/gradual{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_gradual_masks_are_rank_0s_on_every_rank_and_local_runs_stay_local(tmp_path: Path) -> None:
    mp.spawn(_gradual_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"gradual{r}.pt", weights_only=False) for r in range(WORLD)]
    assert ranks[1]["overruled"] > 0 and ranks[0]["overruled"] == 0  # rank 1 did propose other masks
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name
        assert int((~mask).sum()) == mask.numel() // 2
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    assert ranks[0]["losses"] == ranks[1]["losses"]
    # distributed=False: no DDP, no all-reduce: each rank trained on its own batch and they differ
    assert not torch.equal(ranks[0]["local"]["fc1.weight"], ranks[1]["local"]["fc1.weight"])
