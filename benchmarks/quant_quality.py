"""Quality of int8 and bf16 all-MiniLM-L6-v2: held-out embedding cosine and neighbour agreement.

    python benchmarks/quant_quality.py [--save benchmarks/results/quant_minilm_quality.md]

all-MiniLM-L6-v2 with its real weights, 160 held-out English sentences (``tilefx.corpus``) in
batches of 16 × 32 tokens. Each row is one recipe through ``tilefx.optimize`` (the torch graph
with fake-quant nodes) and ``tilefx.compile`` (the int8/bf16 kernels; ``fallback="never"``),
against the fp32 model: mean cosine of the sentence embeddings and nearest-neighbour agreement
(``tilefx.report.embedding_quality``); ``compiled vs graph`` is the relative Frobenius distance
between the compiled model's embeddings and the graph's (two draws of the quantization noise,
docs/methods.md §8). torch's ``quantize_dynamic`` (fbgemm, per-tensor activations) is the peer.
Static grids and the tolerance's costs come from 4 batches of training sentences. Quality only:
nothing here is timed, so a loaded machine does not change it. Never imported by tests.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import tilefx
from tilefx.corpus import english_sentences
from tilefx.lowering import compat
from tilefx.models import SentenceEmbedder
from tilefx.report import embedding_quality, quantization_summary
from tilefx.zoo import load_minilm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import save_result  # noqa: E402

RECIPES = {
    "int8 dynamic (per-token u8, per-channel s8)": tilefx.Quantization(),
    "int8 static (per-tensor u8 from calibration)": tilefx.Quantization(scheme="static"),
    "int8 dynamic, per-tensor weights": tilefx.Quantization(per_channel=False),
    "int8 dynamic, tolerance 0.02": tilefx.Quantization(tolerance=0.02),
    "bf16": tilefx.Quantization(format="bf16"),
}


def _embed(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(ids, mask) for ids, mask in batches])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--save", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    minilm = load_minilm()
    model = SentenceEmbedder(minilm.model).eval()
    training, held = english_sentences()
    batches = minilm.batches(held)
    calibration = [(batch, None) for batch in minilm.batches(training[:64])]
    dense = _embed(model, batches)
    features = compat.cpu_features(compat.make_target("llvm"))
    rows = [
        "| recipe | graph cosine | graph agreement | compiled cosine | compiled agreement | compiled vs graph |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for name, quantization in RECIPES.items():
        gm = tilefx.optimize(model, batches[0], tilefx.Recipe(quantize=quantization), calibration)
        graph = _embed(gm, batches)
        cosine, agreement = embedding_quality(dense, graph)
        needed = "avx512vnni" if quantization.format == "int8" else "avx512bf16"
        compiled_cells = "– | – | –"
        if needed in features:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", tilefx.CoverageWarning)
                compiled = _embed(tilefx.compile(gm, fallback="never"), batches)
            c_cos, c_agree = embedding_quality(dense, compiled)
            distance = float((compiled - graph).norm() / graph.norm())
            compiled_cells = f"{c_cos:.4f} | {c_agree:.1%} | {distance:.2e}"
        rows.append(f"| {name} | {cosine:.4f} | {agreement:.1%} | {compiled_cells} |")
        notes.append(f"- {name}: {quantization_summary(gm)}")
        print(rows[-1], flush=True)
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        peer = torch.ao.quantization.quantize_dynamic(
            SentenceEmbedder(load_minilm().model).eval(), {nn.Linear}
        )
    cosine, agreement = embedding_quality(dense, _embed(peer, batches))
    rows.append(f"| torch quantize_dynamic (fbgemm) | {cosine:.4f} | {agreement:.1%} | – | – | – |")
    body = "\n".join(rows) + "\n\n" + "\n".join(notes)
    print("\n".join(rows[-1:]) + "\n\n" + "\n".join(notes))
    if args.save is not None:
        save_result(args.save, "int8 and bf16 all-MiniLM-L6-v2: embedding quality", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
