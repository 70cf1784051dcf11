"""Distillation options of recovery: pooled-output cosine, token masks, and the choice of hidden taps."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilefx
from tilefx.corpus import english_sentences
from tilefx.errors import RecipeError
from tilefx.passes.recover_sparsity import RecoverSparsityPass, token_mask_position
from tilefx.passes.training.calibration import Calibration
from tilefx.passes.training.distill import DistillLoss, pooled_cosine_distance, relative_mse


class TinyEncoder(nn.Module):
    """A post-norm residual block over a token sequence, called like a BertModel: (x, mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.down(torch.relu(self.up(x)))) * mask.unsqueeze(-1)


def _sequences(count: int = 4) -> list[tuple[tuple[torch.Tensor, torch.Tensor], None]]:
    generator = torch.Generator().manual_seed(2)
    out = []
    for _ in range(count):
        mask = torch.ones(4, 6)
        mask[:, 4:] = 0  # two padding positions per sentence
        out.append(((torch.randn(4, 6, 16, generator=generator), mask), None))
    return out


def test_pooled_cosine_is_the_cosine_of_the_masked_means() -> None:
    s, t = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    want = [
        1 - F.cosine_similarity(s[i, m.bool()].mean(0), t[i, m.bool()].mean(0), dim=0)
        for i, m in enumerate(mask)
    ]
    assert float(pooled_cosine_distance(s, t, mask)) == pytest.approx(
        float(torch.stack(want).mean()), abs=1e-6
    )
    unmasked = 1 - F.cosine_similarity(s.mean(1), t.mean(1), dim=-1)
    assert float(pooled_cosine_distance(s, t)) == pytest.approx(float(unmasked.mean()), abs=1e-6)


def test_a_token_mask_leaves_padding_out_of_every_term() -> None:
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    noisy = s.clone()
    noisy[mask == 0] += 100.0  # only padding changes
    loss = DistillLoss("pooled")
    assert float(loss([noisy], [t], [noisy], [t], mask)) == pytest.approx(
        float(loss([s], [t], [s], [t], mask))
    )
    assert float(relative_mse(noisy, t, mask)) == pytest.approx(float(relative_mse(s, t, mask)))
    assert float(relative_mse(noisy, t)) > float(relative_mse(s, t))
    other = torch.randn(2, 4, 5, 5)  # [batch, heads, seq, seq]: the mask does not apply, all is matched
    assert float(relative_mse(other, other + 1, mask)) == pytest.approx(float(relative_mse(other, other + 1)))


def test_pooled_distillation_is_zero_when_student_is_teacher() -> None:
    out, taps = [torch.randn(2, 5, 8)], [torch.randn(2, 5, 16) * 50]
    mask = torch.ones(2, 5)
    assert float(DistillLoss("pooled")(out, out, taps, taps, mask)) == pytest.approx(0.0, abs=1e-6)


def _pass(hidden_taps: str) -> RecoverSparsityPass:
    return RecoverSparsityPass(
        tilefx.Recovery(steps=1, progress=False, hidden_taps=hidden_taps),  # type: ignore[arg-type]
        calibration=Calibration(_sequences()),
        block=(8, 1),
        sparsity=0.5,
    )


@pytest.mark.parametrize(
    ("hidden_taps", "want"),
    [("inputs", {"relu"}), ("outputs", {"linear", "linear_1"}), ("norms", {"layer_norm"})],
)
def test_hidden_taps_choose_layer_inputs_outputs_or_norms(hidden_taps: str, want: set[str]) -> None:
    gm = tilefx.capture(TinyEncoder(), _sequences()[0][0])
    assert set(_pass(hidden_taps)._taps(gm)) == want


def test_norm_taps_fall_back_to_layer_inputs_without_a_norm() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    gm = tilefx.capture(model, (torch.randn(4, 16),))
    assert _pass("norms")._taps(gm) == _pass("inputs")._taps(gm)


def test_recovery_with_a_token_mask_end_to_end() -> None:
    data = _sequences()
    recovery = tilefx.Recovery(
        steps=6, lr=3e-3, every=2, progress=False, output_loss="pooled", hidden_taps="norms", token_mask=1
    )
    recipe = tilefx.Recipe(
        blocks=tilefx.BlockPruning(block=(8, 1), sparsity=0.5, reorder="none"), recovery=recovery
    )
    gm = tilefx.optimize(TinyEncoder(), data[0][0], recipe, calibration=data)
    x, mask = data[1][0]
    assert gm(x, mask).shape == (4, 6, 16)


def test_a_token_mask_that_is_not_a_two_dimensional_input_is_refused() -> None:
    data = _sequences()
    recipe = tilefx.Recipe(
        blocks=tilefx.BlockPruning(block=(8, 1), sparsity=0.5, reorder="none"),
        recovery=tilefx.Recovery(steps=2, progress=False, token_mask=0),
    )
    with pytest.raises(tilefx.PassError, match="token_mask=0"):
        tilefx.optimize(TinyEncoder(), data[0][0], recipe, calibration=data)
    with pytest.raises(RecipeError, match="Recovery.token_mask"):
        tilefx.Recovery(token_mask=-1)
    with pytest.raises(RecipeError, match="Recovery.hidden_taps"):
        tilefx.Recovery(hidden_taps="everything")  # type: ignore[arg-type]


def test_held_out_sentences_are_never_trained_on() -> None:
    training, held_out = english_sentences(held_out=40, docstrings=False)
    assert len(held_out) == 40 and len(training) > 500
    assert not set(training) & set(held_out)


class _ThreeInputs(nn.Module):
    """A BERT-like signature: ids, a segment input (0/1, not a mask) and the attention mask."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.fc(self.embed(input_ids) + token_type_ids.unsqueeze(-1).float())
        return hidden * attention_mask.unsqueeze(-1)


class _Renamed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens) * keep.unsqueeze(-1)


def test_the_token_mask_is_found_by_name_then_by_shape_and_never_a_segment_input() -> None:
    ids = torch.randint(2, 20, (2, 6))
    segments = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    gm = tilefx.capture(_ThreeInputs().eval(), (ids, segments, mask))
    assert token_mask_position(gm, (ids, segments, mask)) == 2  # by its name
    unnamed = tilefx.capture(_Renamed().eval(), (ids, mask))
    assert token_mask_position(unnamed, (ids, mask)) == 1  # by its shape and values
    assert token_mask_position(unnamed, (ids, torch.zeros_like(mask))) is None  # a row without a 1
    floats = tilefx.capture(nn.Linear(4, 4), (torch.randn(3, 4),))
    assert token_mask_position(floats, (torch.randn(3, 4),)) is None


def test_recovery_finds_the_token_mask_by_default() -> None:
    assert tilefx.Recovery().token_mask == "auto"
