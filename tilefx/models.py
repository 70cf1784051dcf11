"""Model factories for the command line (``tilefx optimize tilefx.models:minilm ...``).

Each factory takes no arguments and returns an ``nn.Module`` in eval mode whose inputs and
outputs are plain tensors, the shape ``tilefx optimize --input`` describes.
"""

from __future__ import annotations

import torch

from tilefx.zoo import load_minilm, mean_pooled

__all__ = ["SentenceEmbedder", "minilm"]


class SentenceEmbedder(torch.nn.Module):
    """A BERT-style encoder as a sentence embedder: ``(input_ids, attention_mask) -> [batch, dim]``.

    Mean-pooled over real tokens and L2-normalised, as all-MiniLM-L6-v2 was trained, so the
    output compared in verification is the embedding users search with.
    """

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids, attention_mask).last_hidden_state
        return mean_pooled(hidden, attention_mask)


def minilm() -> SentenceEmbedder:
    """all-MiniLM-L6-v2 with its real weights (loaded offline from the installed package)."""
    return SentenceEmbedder(load_minilm().model).eval()
