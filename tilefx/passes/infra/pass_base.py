"""The pass contract: a frozen dataclass whose fields are its options, one ``run``, an honest result."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch.fx

from ..metadata import apply_masks
from .analysis_manager import AnalysisManager

__all__ = ["Numerics", "PassBase", "PassResult"]

Numerics = Literal["exact", "masked", "unchecked"]


@dataclass(frozen=True)
class PassResult:
    """What a pass returns. ``modified`` must be True exactly when the graph or weights changed."""

    graph_module: torch.fx.GraphModule
    modified: bool


class PassBase(abc.ABC):
    """Base of every rewrite pass.

    Subclasses are frozen dataclasses (options are fields, no state between calls) and declare:
      - ``numerics``: "exact" (outputs must equal the pipeline input's, or what the last masked
        pass claimed), "masked" (outputs must equal :meth:`masked_reference`), or "unchecked"
        (the pass says nothing about values; avoid).
      - ``preserves``: analysis classes whose cached results stay valid after a modifying run.
      - ``reads_unpruned``: the pass learns from ``AnalysisManager.unpruned`` (the model before
        the pipeline pruned it), which the manager then keeps.
    A pass edits the graph module it is given in place, as torch.fx passes do: ``pass_(gm)``
    changes ``gm``. :meth:`PassManager.run` is the one owner of a working copy: it copies its
    input once, so the caller's graph module is never touched.
    """

    numerics: ClassVar[Numerics] = "exact"
    preserves: ClassVar[frozenset[type]] = frozenset()
    reads_unpruned: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def __call__(self, gm: torch.fx.GraphModule, *, example_inputs: Sequence[Any] = ()) -> PassResult:
        """Run this pass alone on ``gm`` (in place, unverified), e.g. ``FoldBatchNormPass()(gm)``.

        ``example_inputs`` are for passes whose analyses need shapes; the PassManager calls
        :meth:`apply` with the pipeline's analysis manager instead.
        """
        return self.apply(gm, AnalysisManager(gm, example_inputs))

    def apply(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        """Check :meth:`requires`, then :meth:`run`."""
        self.requires(gm, am)
        return self.run(gm, am)

    def requires(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> None:
        """The docstring's ``Requires:``, checked: raise :class:`PreconditionError` if ``gm`` breaks it."""
        return None

    @abc.abstractmethod
    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        """Rewrite ``gm``; return the result and whether anything changed."""

    def masked_reference(
        self, before: torch.fx.GraphModule, after: torch.fx.GraphModule, example_inputs: Sequence[Any]
    ) -> torch.fx.GraphModule:
        """For ``numerics == "masked"``: the input model with what this pass claims to remove zeroed.

        ``before`` is a private copy the method may edit and return. The default applies every
        sparsity record in ``after``'s metadata to the same-named parameter of ``before``.
        """
        return apply_masks(before, after)
