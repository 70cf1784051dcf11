"""Hashes of everything a fixed optimize + compile produces, printed as JSON (run by a test, twice).

``python -m tests.pipeline_fingerprint`` builds two models of the lowering catalogue, optimizes
them with one recipe (channel pruning, TETRIS reordering, block pruning) and compiles them with
``fallback="never"``. It prints a hash per pruned parameter and buffer, per sparsity, channel and
permutation record, of the graph code, of the pruned and compiled outputs, plus the kernel cache
keys and the kernel libraries in ``$TILEFX_CACHE_DIR``. Two processes must print the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import replace

import torch

import tilefx
from tests.random_models import (
    LOWERABLE,
    ModelSpec,
    build,
)
from tilefx.lowering import compat, openmp_launch
from tilefx.lowering.build import KernelCache, layer_spec
from tilefx.lowering.plan import plan_graph
from tilefx.passes.metadata import BlockSparsity, ChannelSelection, ElementMask, Permutation, get_metadata

__all__ = ["MODELS", "RECIPE", "fingerprint"]

MODELS: dict[str, ModelSpec] = {
    name: replace(LOWERABLE[name], seed=seed) for name, seed in (("convnet", 11), ("encoder", 12))
}

RECIPE = tilefx.Recipe(
    channels=tilefx.ChannelPruning(ratio=0.25, round_to=4),
    blocks=tilefx.BlockPruning(block=(4, 1), sparsity=0.5),
)


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().cpu()
    return hashlib.sha256(data.numpy().tobytes() + str((data.dtype, tuple(data.shape))).encode()).hexdigest()


def _record(record: object) -> str:
    if isinstance(record, (BlockSparsity, ElementMask)):
        block = record.block if isinstance(record, BlockSparsity) else None
        return f"{type(record).__name__}{block}:{_digest(record.mask.bool())}"
    if isinstance(record, (ChannelSelection, Permutation)):
        return repr(record)
    return type(record).__name__


def fingerprint(name: str, spec: ModelSpec) -> dict[str, str]:
    torch.manual_seed(0)
    model, inputs = build(spec)
    pruned = tilefx.optimize(model, inputs, recipe=RECIPE)
    compiled = tilefx.compile(pruned, fallback="never", cache_dir=openmp_launch.cache_dir() / "kernels")
    out: dict[str, str] = {f"{name}/code": hashlib.sha256(pruned.code.encode()).hexdigest()}
    for key, tensor in [*pruned.named_parameters(), *pruned.named_buffers()]:
        out[f"{name}/tensor/{key}"] = _digest(tensor)
    for key, records in get_metadata(pruned).params.items():
        out[f"{name}/records/{key}"] = ";".join(_record(r) for r in records)
    with torch.no_grad():
        out[f"{name}/output/pruned"] = _digest(pruned(*inputs))
        out[f"{name}/output/compiled"] = _digest(compiled(*inputs))
    target = compat.make_target("llvm")
    for layer in plan_graph(pruned).layers:
        nnzb = int(layer.sparsity.mask.sum())
        out[f"{name}/kernel_key/{layer.node}"] = KernelCache.key(
            layer_spec(layer, nnzb, layer.input_shape), target
        )
    return out


def main() -> None:
    result: dict[str, str] = {}
    for name, spec in MODELS.items():
        result.update(fingerprint(name, spec))
    kernels = openmp_launch.cache_dir() / "kernels"
    result["kernel_files"] = (
        ",".join(sorted(p.name for p in kernels.glob("bsr_*.so"))) if kernels.is_dir() else ""
    )
    result["python_hash_seed"] = os.environ.get("PYTHONHASHSEED", "")
    json.dump(result, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
