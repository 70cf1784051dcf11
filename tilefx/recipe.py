"""Recipes: what the user asks ``optimize`` to do, as frozen, validated dataclasses.

Every option is checked at construction; an unknown option or a value out of range raises
:class:`RecipeError` (a ``ValueError``) naming the field, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from tilefx.passes.infra.errors import RecipeError
from tilefx.passes.training.dcp import DCPOptions
from tilefx.passes.training.finetune import SGDOptions

__all__ = ["BlockPruning", "ChannelPruning", "ConnectionPruning", "Recipe"]

T = TypeVar("T")

ChannelCriterion = Literal["l1", "l2", "bn_scale", "taylor", "dcp"]
ConnectionCriterion = Literal["synaptic_strength", "l1"]


def _check_options(owner: str, cls: type, keys: Any) -> None:
    """An unknown option is a RecipeError that suggests the closest known field."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known options: {', '.join(known)}"
            raise RecipeError(f"{owner}: unknown option {key!r}{hint}")


def _strict(cls: type[T]) -> type[T]:
    """Check keyword options of ``cls`` by :func:`_check_options` before its own init runs."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        _check_options(cls.__name__, cls, kwargs)
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def _dcp_options(data: Mapping[str, Any]) -> DCPOptions:
    """DCPOptions from plain data (a TOML table), its ``solver`` table included."""
    _check_options("ChannelPruning.dcp", DCPOptions, data)
    options = dict(data)
    if isinstance(options.get("solver"), Mapping):
        _check_options("ChannelPruning.dcp.solver", SGDOptions, options["solver"])
        options["solver"] = SGDOptions(**options["solver"])
    return DCPOptions(**options)


def _fraction(owner: str, name: str, value: float, *, allow_zero: bool = True) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise RecipeError(f"{owner}.{name} must be a number in {interval}, got {value!r}")


def _choice(owner: str, name: str, value: object, choices: tuple[object, ...]) -> None:
    if value not in choices:
        raise RecipeError(f"{owner}.{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


@_strict
@dataclass(frozen=True)
class ChannelPruning:
    """Remove whole channels (physically shrinking layers), coupled channels kept consistent.

    ratio: fraction of channels removed in each prunable group (or globally with ``scope="global"``).
    protect: node or parameter-name prefixes never pruned (e.g. the stem or the classifier).
    round_to: keep channel counts multiples of this (kernels like 8 or 16).
    attention: in multi-head attention, remove the same head dims from every head ("head_dims")
    or whole heads ("heads").
    dcp: DCP's options for ``criterion="dcp"`` (a ``DCPOptions`` or a dict of its fields): paper or
    code variant, heads, λ, auxiliary fine-tune budget, and ``epsilon`` for DCP-Adapt, whose
    selection then decides how many channels each DCP-scored layer keeps. Its ``rate`` is
    always ``ratio``.
    """

    ratio: float = 0.3
    criterion: ChannelCriterion = "l1"
    scope: Literal["layer", "global"] = "layer"
    protect: tuple[str, ...] = ()
    round_to: int = 1
    attention: Literal["head_dims", "heads"] = "head_dims"
    dcp: DCPOptions | None = None

    def __post_init__(self) -> None:
        _fraction("ChannelPruning", "ratio", self.ratio)
        if isinstance(self.dcp, Mapping):
            object.__setattr__(self, "dcp", _dcp_options(self.dcp))
        if self.dcp is not None and not isinstance(self.dcp, DCPOptions):
            raise RecipeError(
                f"ChannelPruning.dcp must be a DCPOptions or a dict, got {type(self.dcp).__name__}"
            )
        if self.dcp is not None and self.criterion != "dcp":
            raise RecipeError(f'ChannelPruning.dcp is only read with criterion="dcp", not {self.criterion!r}')
        _choice("ChannelPruning", "attention", self.attention, ("head_dims", "heads"))
        _choice("ChannelPruning", "criterion", self.criterion, ("l1", "l2", "bn_scale", "taylor", "dcp"))
        _choice("ChannelPruning", "scope", self.scope, ("layer", "global"))
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise RecipeError(f"ChannelPruning.round_to must be a positive integer, got {self.round_to!r}")


@_strict
@dataclass(frozen=True)
class ConnectionPruning:
    """Zero whole (out-channel, in-channel) kernels of convs and (out, in) entries of linears."""

    sparsity: float = 0.5
    criterion: ConnectionCriterion = "synaptic_strength"

    def __post_init__(self) -> None:
        _fraction("ConnectionPruning", "sparsity", self.sparsity)
        _choice("ConnectionPruning", "criterion", self.criterion, ("synaptic_strength", "l1"))


@_strict
@dataclass(frozen=True)
class BlockPruning:
    """Prune whole (rows, cols) blocks of weight matrices, after TETRIS reordering by default.

    tetris: the TETRIS preset — "faithful" (the authors' EM from identity orders), "fast"
    (clustered initial orders, one EM run) or "best" (several starts and restarts; slowest).
    """

    block: tuple[int, int] = (32, 1)
    sparsity: float = 0.8
    reorder: Literal["tetris", "none"] = "tetris"
    tetris: Literal["faithful", "fast", "best"] = "fast"

    def __post_init__(self) -> None:
        block = tuple(self.block)
        if len(block) != 2 or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block
        ):
            raise RecipeError(
                f"BlockPruning.block must be two positive integers (rows, cols), got {self.block!r}"
            )
        object.__setattr__(self, "block", block)
        _fraction("BlockPruning", "sparsity", self.sparsity)
        _choice("BlockPruning", "reorder", self.reorder, ("tetris", "none"))
        _choice("BlockPruning", "tetris", self.tetris, ("faithful", "fast", "best"))


@_strict
@dataclass(frozen=True)
class Recipe:
    """The whole optimisation request. The default folds batch norms and cleans up (exact only).

    tolerance: allowed max abs error relative to the output scale in verification.
    """

    fold_batchnorm: bool = True
    channels: ChannelPruning | None = None
    connections: ConnectionPruning | None = None
    blocks: BlockPruning | None = None
    skip: tuple[str, ...] = ()
    verify: bool = True
    tolerance: float = 1e-5

    def __post_init__(self) -> None:
        for name, kind in (
            ("channels", ChannelPruning),
            ("connections", ConnectionPruning),
            ("blocks", BlockPruning),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise RecipeError(
                    f"Recipe.{name} must be a tilefx.{kind.__name__} or None, got {type(value).__name__}"
                )
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise RecipeError(f"Recipe.skip must be a tuple of op or node names, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
        if not isinstance(self.tolerance, (int, float)) or not 0 < self.tolerance < 1:
            raise RecipeError(f"Recipe.tolerance must be in (0, 1), got {self.tolerance!r}")

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Recipe:
        """Build from plain data (a parsed TOML file); sections become the option dataclasses."""
        sections = {"channels": ChannelPruning, "connections": ConnectionPruning, "blocks": BlockPruning}
        fields: dict[str, Any] = {}
        for key, value in data.items():
            if key in sections:
                if not isinstance(value, Mapping):
                    raise RecipeError(f"Recipe.{key} must be a table of options, got {value!r}")
                options = dict(value)
                if "block" in options:
                    options["block"] = tuple(options["block"])
                fields[key] = sections[key](**options)
            else:
                fields[key] = tuple(value) if key == "skip" else value
        return Recipe(**fields)
