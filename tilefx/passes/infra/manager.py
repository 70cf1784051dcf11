"""Runs a pipeline of passes: analyses cached between them, instruments around them, honesty checked."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from tilefx.errors import PassError, VerificationError

from .analysis_manager import AnalysisManager
from .instruments import Instrument
from .pass_base import PassBase, PassResult
from .verify import PassCheck, VerifyInstrument

__all__ = ["PassManager", "PipelineResult"]


@dataclass(frozen=True)
class PipelineResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    ran: tuple[tuple[str, bool], ...]  # (pass name, modified) in run order
    checks: tuple[PassCheck, ...] = ()  # the verification of each modifying pass, in run order


class PassManager:
    """Runs ``passes`` in order on one deep copy of the graph module it is given, never on the original.

    With ``verify`` (the default) a :class:`VerifyInstrument` checks the input and every modifying
    pass. Every pass's ``requires`` is checked before it runs and its ``modified`` flag against
    what actually changed. A failing pass is re-raised as a :class:`PassError` naming the pass and
    those before it. ``run`` keeps no state between calls: one manager can run any number of graphs.
    """

    def __init__(
        self,
        passes: Sequence[PassBase],
        instruments: Sequence[Instrument] = (),
        verify: bool = True,
        tolerance: float = 1e-5,
    ) -> None:
        self.passes = list(passes)
        self.verifier = VerifyInstrument(tolerance) if verify else None
        self.instruments = ([self.verifier] if self.verifier else []) + list(instruments)

    def run(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any] = ()) -> PipelineResult:
        """The passes' result on a copy of ``gm``; ``gm`` itself (graph, weights, metadata) is untouched."""
        original, gm = gm, copy.deepcopy(gm)
        am = AnalysisManager(gm, example_inputs)
        for instrument in self.instruments:
            instrument.before_pipeline(original, am)
        ran: list[tuple[str, bool]] = []
        keep_unpruned = any(p.reads_unpruned for p in self.passes)
        for pass_ in self.passes:
            if keep_unpruned and am.unpruned is None and pass_.numerics != "exact":
                # The teacher of later refits and distillation: the model as the exact passes
                # left it (batch norms folded), before anything was pruned.
                am.unpruned = copy.deepcopy(gm)
            try:
                result = self._run_one(pass_, gm, am)
            except Exception as exc:
                raise PassError.wrap(pass_.name, [name for name, _ in ran], exc) from exc
            gm = result.graph_module
            ran.append((pass_.name, result.modified))
        checks = tuple(self.verifier.checks) if self.verifier else ()
        return PipelineResult(gm, any(m for _, m in ran), tuple(ran), checks)

    def _run_one(self, pass_: PassBase, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        snapshot = copy.deepcopy(gm) if any(i.wants_snapshot(pass_) for i in self.instruments) else None
        fingerprint = _Fingerprint.of(gm)
        for instrument in self.instruments:
            instrument.before_pass(pass_, gm, am)
        result = pass_.apply(gm, am)
        changed = fingerprint.differs(result.graph_module)
        if changed != result.modified:
            raise VerificationError(
                f"{pass_.name} reported modified={result.modified} but "
                + ("changed the graph or its weights" if changed else "changed nothing")
            )
        if result.modified:
            am.update(result.graph_module, pass_.preserves)
        for instrument in self.instruments:
            instrument.after_pass(pass_, snapshot, result, am)
        return result


@dataclass(frozen=True)
class _Fingerprint:
    """Cheap record of a graph module: its code, metadata, and each tensor with its version."""

    code: str
    meta: dict[str, Any]
    tensors: dict[str, tuple[torch.Tensor, int]]

    @staticmethod
    def of(gm: torch.fx.GraphModule) -> _Fingerprint:
        tensors = {name: (t, t._version) for name, t in _named_tensors(gm)}
        return _Fingerprint(gm.graph.python_code("self").src, dict(gm.meta), tensors)

    def differs(self, gm: torch.fx.GraphModule) -> bool:
        if gm.graph.python_code("self").src != self.code or _meta_differs(self.meta, gm.meta):
            return True
        after = dict(_named_tensors(gm))
        if after.keys() != self.tensors.keys():
            return True
        return any(
            _tensor_differs(old, version, after[name]) for name, (old, version) in self.tensors.items()
        )


def _named_tensors(gm: torch.nn.Module) -> itertools.chain[tuple[str, torch.Tensor]]:
    return itertools.chain(
        gm.named_parameters(remove_duplicate=False), gm.named_buffers(remove_duplicate=False)
    )


def _meta_differs(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return old.keys() != new.keys() or any(old[k] is not new[k] for k in old)


def _tensor_differs(old: torch.Tensor, version: int, new: torch.Tensor) -> bool:
    if new is old:
        return new._version != version
    return new.shape != old.shape or new.dtype != old.dtype or not torch.equal(new, old)
