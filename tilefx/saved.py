"""A directory holding one ``optimize`` result with everything tilefx knows about it.

``torch.export`` archives keep a model's code and weights but drop ``gm.meta``, where the
passes leave the sparsity records that lowering reads; a saved result keeps them, plus the
example inputs, the recipe, the captured dense graph (for before/after comparisons) and the
pass timings, so ``tilefx compile``, ``export``, ``bench`` and ``report`` work on it later.

Layout: ``manifest.json`` (format version, tilefx and torch versions, input shapes and dtypes)
and ``model.pt`` (a ``torch.save`` pickle). Loading a pickle runs code from the file: load only
directories you made or trust.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from tilefx.errors import CaptureError
from tilefx.passes import quant_ops  # noqa: F401  (registers torch.ops.tilefx, which saved graphs may call)
from tilefx.passes.infra.instruments import PassTiming
from tilefx.passes.metadata import Metadata, get_metadata, set_metadata

__all__ = ["FORMAT", "SavedResult", "load", "save"]

FORMAT = "tilefx-saved/1"
_MODEL = "model.pt"
_MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class SavedResult:
    """An optimize result as saved: the optimized and dense graphs, inputs, recipe, timings."""

    optimized: torch.fx.GraphModule
    example_inputs: tuple[Any, ...]
    dense: torch.fx.GraphModule | None = None
    timings: tuple[PassTiming, ...] = ()
    source: str = ""

    @property
    def recipe(self) -> Any:
        return get_metadata(self.optimized).recipe


def _describe(value: Any) -> dict[str, Any]:
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    return {"type": type(value).__name__}


def _picklable(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy without torch.export's tracer class, which cannot be unpickled (it re-traces the code)."""
    graph = copy.deepcopy(gm.graph)
    graph._tracer_cls = None
    out = torch.fx.GraphModule(gm, graph)
    out.meta = dict(gm.meta)
    return out


def save(result: SavedResult, directory: str | Path) -> Path:
    """Write ``result`` into ``directory`` (created); returns it. Raises OSError if it cannot."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "optimized": _picklable(result.optimized),
        "metadata": get_metadata(result.optimized),
        "dense": None if result.dense is None else _picklable(result.dense),
        "example_inputs": tuple(result.example_inputs),
        "timings": tuple(result.timings),
    }
    torch.save(payload, out / _MODEL)
    manifest = {
        "format": FORMAT,
        "source": result.source,
        "torch": torch.__version__,
        "inputs": [_describe(x) for x in result.example_inputs],
        "sparse_parameters": sorted(get_metadata(result.optimized).params),
        "recipe": repr(result.recipe),
        "warning": "model.pt is a pickle: loading it runs code; load only directories you trust",
    }
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _propagate_shapes(gm: torch.fx.GraphModule, inputs: tuple[Any, ...], root: Path) -> None:
    """Unpickling re-traces the code, which drops each node's ``meta["val"]``; lowering reads it."""
    try:
        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    except Exception as exc:  # the saved inputs no longer fit the saved graph
        raise CaptureError(
            f"{root}: the saved example inputs do not run the saved graph ({type(exc).__name__})"
        ) from exc


def load(directory: str | Path) -> SavedResult:
    """The result saved in ``directory``; a missing or foreign directory is a CaptureError naming it.

    Unpickles ``model.pt`` (``weights_only=False``: the graph's code is pickled), which runs code:
    load only directories you trust.
    """
    root = Path(directory)
    manifest_path = root / _MANIFEST
    if not root.is_dir():
        raise CaptureError(f"{root}: no such directory (write one with `tilefx optimize ... -o {root}`)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except OSError as exc:
        raise CaptureError(
            f"{manifest_path}: cannot read it ({exc.strerror or exc}); not a tilefx output"
        ) from exc
    except json.JSONDecodeError as exc:
        raise CaptureError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CaptureError(f"{manifest_path}: format {found!r}, this tilefx reads {FORMAT!r}")
    try:
        payload = torch.load(root / _MODEL, weights_only=False)
    except Exception as exc:  # a truncated or foreign pickle can raise anything
        raise CaptureError(f"{root / _MODEL}: cannot load it ({type(exc).__name__}: {exc})") from exc
    optimized = payload.get("optimized") if isinstance(payload, dict) else None
    if not isinstance(optimized, torch.fx.GraphModule) or not isinstance(payload.get("metadata"), Metadata):
        raise CaptureError(f"{root / _MODEL} does not hold a tilefx optimize result")
    set_metadata(optimized, payload["metadata"])
    inputs = tuple(payload["example_inputs"])
    dense = payload.get("dense")
    for gm in (optimized, dense):
        if isinstance(gm, torch.fx.GraphModule):
            _propagate_shapes(gm, inputs, root)
    return SavedResult(
        optimized=optimized,
        example_inputs=inputs,
        dense=dense if isinstance(dense, torch.fx.GraphModule) else None,
        timings=tuple(payload.get("timings", ())),
        source=str(manifest.get("source", "")),
    )
