"""Channel criteria: one module each, listed here in one catalogue.

Every criterion is a :class:`~.base.Criterion` record defined beside its code (``magnitude``:
"l1", "l2"; ``bn_scale``; ``taylor``; ``dcp``; ``vrpge``; ``zeroed_filters``). This catalogue is
the one place their names are spelled: ``tilefx.ChannelPruning`` validates ``criterion`` and the
type of ``options`` against it, ``tilefx.optimize`` asks it whether calibration data is needed,
and the default pipeline where the pass goes (before folding batch norms, after structure
training). A criterion of your own: build a ``Criterion`` and :func:`register_criterion` it.
"""

from __future__ import annotations

from tilefx.errors import RecipeError

from .base import ChannelScores, Criterion, CriterionOptions, ScoreFunction, ScoringInputs
from .bn_scale import BN_SCALE
from .dcp import DCP
from .magnitude import L1, L2
from .taylor import TAYLOR
from .vrpge import VRPGE
from .zeroed_filters import ZEROED_FILTERS

__all__ = [
    "ChannelScores",
    "Criterion",
    "CriterionOptions",
    "ScoreFunction",
    "ScoringInputs",
    "criteria",
    "criterion",
    "register_criterion",
]

_CATALOGUE: dict[str, Criterion] = {c.name: c for c in (L1, L2, BN_SCALE, TAYLOR, DCP, VRPGE, ZEROED_FILTERS)}


def register_criterion(entry: Criterion) -> Criterion:
    """Add ``entry`` to the catalogue (replacing a criterion of the same name); returns it."""
    if not isinstance(entry, Criterion):
        raise RecipeError(f"register_criterion takes a Criterion, got {type(entry).__name__}")
    _CATALOGUE[entry.name] = entry
    return entry


def criteria(public: bool = False) -> tuple[str, ...]:
    """Names in the catalogue (only those ``ChannelPruning.criterion`` accepts, with ``public``)."""
    return tuple(name for name, entry in _CATALOGUE.items() if entry.public or not public)


def criterion(name: str) -> Criterion:
    """The catalogue's entry for ``name``; an unknown name is a RecipeError listing the known ones."""
    entry = _CATALOGUE.get(name)
    if entry is None:
        known = ", ".join(map(repr, criteria(public=True)))
        raise RecipeError(f"unknown channel criterion {name!r}; the known ones are {known}")
    return entry
