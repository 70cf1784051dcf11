"""Measured latency of one layer under one option, on this machine, cached: the search's time table.

A layer option (a block sparsity, a number format) is timed as ``tilefx.compile`` runs it: a
one-layer model of the layer's shape is optimized with that option and compiled (block sparsity
at that density with a random pattern — a kernel's time depends on how many blocks it stores, not
on where they are), and timed interleaved with dense torch (``tilefx.timing``). The option's ratio
over dense torch is cached in a JSON file per machine (CPU model and flags, thread count, tilefx,
kernel, torch and TVM versions) in the tilefx cache directory, so a search compiles each (shape, option)
once; dense times are measured afresh by every search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from tilefx.passes.coverage import CoverageWarning
from tilefx.passes.infra.manager import PassManager
from tilefx.passes.infra.pass_base import PassBase
from tilefx.passes.prune_blocks import PruneBlocksPass
from tilefx.passes.quantize_linears import Quantization, QuantizeLinearsPass
from tilefx.passes.search.losses import Option
from tilefx.timing import Timing, interleaved_timings

from ._version import __version__
from .graph_capture import capture

__all__ = ["LatencyTable", "LayerShape"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerShape:
    """A linear layer as a GEMM: ``rows`` input rows (tokens × batch) of ``k`` features, ``n``
    outputs; or (``conv`` set) a 2-d convolution of input ``[rows, k, H, W]`` to ``n`` channels with
    ``conv = (H, W, kh, kw, stride, padding, dilation, groups)``, timed dense only."""

    rows: int
    k: int
    n: int
    conv: tuple[int, ...] | None = None

    @property
    def key(self) -> str:
        if self.conv is None:
            return f"linear {self.rows}x{self.k}->{self.n}"
        return f"conv {self.rows}x{self.k}x{self.conv[0]}x{self.conv[1]}->{self.n} {self.conv[2:]}"

    def dense(self) -> tuple[nn.Module, torch.Tensor]:
        """A random layer of this shape and an input for it."""
        if self.conv is None:
            return nn.Linear(self.k, self.n).eval(), torch.randn(self.rows, self.k)
        h, w, kh, kw, stride, padding, dilation, groups = self.conv
        layer = nn.Conv2d(self.k, self.n, (kh, kw), stride, padding, dilation, groups).eval()
        return layer, torch.randn(self.rows, self.k, h, w)


class LatencyTable:
    """Milliseconds of layer options on this machine.

    ``table.ms(shape, Option())``: dense fp32 torch, measured once per table (a search makes one);
    ``table.ms(shape, option)``: that times the option's speed ratio over dense torch, measured in
    one interleaved session with dense torch on first use and cached. Only ratios are cached: a
    busy machine slows both contenders of a session alike but makes absolute times of one hour
    useless the next. ``cache``: the JSON file (default:
    ``$TILEFX_CACHE_DIR``/latency-<machine>.json; None: memory only).
    """

    def __init__(self, cache: Path | None | str = "default", rounds: int = 15) -> None:
        self.rounds = rounds
        self.path = _default_path() if cache == "default" else (Path(cache) if cache is not None else None)
        self.ratios: dict[str, float] = {}
        self.dense: dict[str, float] = {}
        if self.path is not None and self.path.exists():
            try:
                self.ratios = {str(k): float(v) for k, v in json.loads(self.path.read_text()).items()}
            except (OSError, ValueError):
                log.warning("latency cache %s is unreadable; measuring again", self.path)

    def ms(self, shape: LayerShape, option: Option) -> float:
        if shape.key not in self.dense:
            self.dense[shape.key] = self._time(shape, None)["dense"].median
        if option.block is None and option.format == "fp32":
            return self.dense[shape.key]
        key = f"{shape.key}|{option.name}"
        if key not in self.ratios:
            times = self._time(shape, option)
            self.ratios[key] = times["option"].median / times["dense"].median
            log.info("latency %s %s: %.3f of dense", shape.key, option.name, self.ratios[key])
            self._save()
        return self.dense[shape.key] * self.ratios[key]

    def model_ms(self, model: torch.nn.Module, inputs: Sequence[Any]) -> float:
        """The whole model's median milliseconds on ``inputs`` (measured each time: it is one run)."""
        flat = pytree.tree_leaves(tuple(inputs))
        return interleaved_timings({"model": lambda: model(*flat)}, rounds=self.rounds, warmup=3)[
            "model"
        ].median

    def _time(self, shape: LayerShape, option: Option | None) -> dict[str, Timing]:
        """Dense torch, and the option compiled, timed in one interleaved session."""
        torch.manual_seed(0)
        layer, x = shape.dense()
        calls: dict[str, Callable[[], object]] = {"dense": lambda: layer(x)}
        if option is not None:
            if shape.conv is not None:
                raise ValueError(f"{shape.key}: convolutions are timed dense only, not {option.name}")
            calls["option"] = _compiled(layer, x, option)
        return interleaved_timings(calls, rounds=self.rounds, warmup=2, burst=3)

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(self.ratios, indent=0, sort_keys=True))
            partial.replace(self.path)
        except OSError as exc:
            log.warning("latency cache %s not written (%s); ratios stay in memory", self.path, exc)


def _compiled(layer: nn.Module, x: torch.Tensor, option: Option) -> Callable[[], object]:
    """``layer`` with ``option`` applied by its passes and compiled, every kernel lowered."""
    from tilefx.lowering.build import compile_graph  # tvm is imported only when compiling

    passes: list[PassBase] = []
    if option.block is not None:
        passes.append(PruneBlocksPass(option.block, option.sparsity))
    if option.format != "fp32":
        passes.append(QuantizeLinearsPass(Quantization(format=option.format)))  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoverageWarning)
        pruned = PassManager(passes, verify=False).run(capture(layer, (x,)), (x,)).graph_module
        compiled = compile_graph(pruned, "llvm", fallback="never")
    return lambda: compiled(x)


def _default_path() -> Path:
    from .lowering import openmp_launch  # the cache directory tilefx keeps private (imports tvm)

    return openmp_launch.cache_dir() / f"latency-{_machine()}.json"


def _machine() -> str:
    """This machine as latency sees it: CPU model and flags, threads, the library and kernel versions."""
    cpu = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((line for line in info.splitlines() if line.startswith("model name")), "")
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
        cpu = model + flags
    except OSError:
        cpu = platform.processor()
    import tvm

    from .lowering.build import KERNEL_VERSION  # new templates, new ratios

    text = f"{cpu}|{torch.get_num_threads()}|{__version__}|{KERNEL_VERSION}|{torch.__version__}|{tvm.__version__}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]
