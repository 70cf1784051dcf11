"""Instruments observe a pipeline from outside the passes: timing, graph dumps, verification.

Debugging lives here, never inside passes. An instrument sees each pass before and after it runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.fx

from .analysis_manager import AnalysisManager
from .pass_base import PassBase, PassResult

__all__ = [
    "DumpGraphInstrument",
    "Instrument",
    "PassTiming",
    "PrintAfterChangeInstrument",
    "TimingInstrument",
]

log = logging.getLogger(__name__)


class Instrument:
    """Hooks called by the PassManager; override what you need."""

    def wants_snapshot(self, pass_: PassBase) -> bool:
        """Whether :meth:`after_pass` needs an untouched copy of the graph from before the pass."""
        return False

    def before_pipeline(self, original: torch.fx.GraphModule, am: AnalysisManager) -> None:
        """Called once per :meth:`PassManager.run`: start per-run state here.

        ``original`` is the caller's graph module, which the run never edits; the passes work on
        ``am.gm``, a copy.
        """
        return None

    def before_pass(self, pass_: PassBase, gm: torch.fx.GraphModule, am: AnalysisManager) -> None:
        return None

    def after_pass(
        self,
        pass_: PassBase,
        before: torch.fx.GraphModule | None,
        result: PassResult,
        am: AnalysisManager,
    ) -> None:
        return None


@dataclass(frozen=True)
class PassTiming:
    name: str
    seconds: float
    modified: bool


@dataclass
class TimingInstrument(Instrument):
    """Records wall time per pass, in run order."""

    timings: list[PassTiming] = field(default_factory=list)
    _start: float = 0.0

    def before_pass(self, pass_: PassBase, gm: torch.fx.GraphModule, am: AnalysisManager) -> None:
        self._start = time.perf_counter()

    def after_pass(
        self, pass_: PassBase, before: torch.fx.GraphModule | None, result: PassResult, am: AnalysisManager
    ) -> None:
        self.timings.append(PassTiming(pass_.name, time.perf_counter() - self._start, result.modified))


@dataclass
class DumpGraphInstrument(Instrument):
    """Writes ``NNN_<pass>.py`` (the graph's code) into ``directory`` after every pass."""

    directory: Path
    _count: int = 0

    def after_pass(
        self, pass_: PassBase, before: torch.fx.GraphModule | None, result: PassResult, am: AnalysisManager
    ) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self._count:03d}_{pass_.name}.py"
        path.write_text(result.graph_module.code)
        self._count += 1


@dataclass
class PrintAfterChangeInstrument(Instrument):
    """Logs the graph's code at INFO after every pass that reports a change."""

    def after_pass(
        self, pass_: PassBase, before: torch.fx.GraphModule | None, result: PassResult, am: AnalysisManager
    ) -> None:
        if result.modified:
            log.info("after %s:\n%s", pass_.name, result.graph_module.code)
