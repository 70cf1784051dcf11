"""Option dataclasses checked from their annotations: one schema for recipes, passes and loops.

``@options`` makes a class a frozen dataclass whose construction checks every field against what
its annotation says, before any work starts, and raises :class:`~tilefx.errors.RecipeError`
naming the field:

- an unknown keyword (with the closest known one suggested);
- a value of the wrong type: ``int`` / ``float`` / ``bool`` (``True`` is not the number 1),
  ``str``, ``tuple[...]`` (a list is accepted and stored as a tuple), unions and ``None``, an
  options dataclass (a mapping of its fields, e.g. a TOML table, is converted to it);
- a ``Literal`` value outside its choices (the message lists them);
- a number outside the bounds given with :func:`option` (``ge``, ``gt``, ``le``, ``lt``).

Rules that relate several fields are a ``check(self)`` method; every class of the hierarchy may
have one and each runs once, base first, so an options class that extends another (the training
loop's :class:`~tilefx.passes.training.loop.LoopOptions` extended by ``tilefx.Recovery``) keeps
the base's rules without restating them. A ``normalize(self)`` method runs before the checks, for
conversions that depend on another field. Imports nothing of tilefx but its errors, so every
layer may use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union, dataclass_transform, get_args, get_origin

from tilefx.errors import RecipeError

__all__ = ["choices", "nested", "option", "options"]

T = TypeVar("T")

_BOUNDS = "tilefx.bounds"


@dataclass(frozen=True)
class _Bounds:
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, value: float) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self) -> str:
        low = (
            f"[{_num(self.ge)}"
            if self.ge is not None
            else f"({_num(self.gt)}"
            if self.gt is not None
            else None
        )
        high = (
            f"{_num(self.le)}]"
            if self.le is not None
            else f"{_num(self.lt)})"
            if self.lt is not None
            else None
        )
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}"
        return f"<= {_num(self.le)}" if self.le is not None else f"< {_num(self.lt)}"


def _num(value: float | None) -> str:
    return repr(int(value)) if value is not None and float(value).is_integer() else repr(value)


def option(
    *,
    default: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A field with numeric bounds checked at construction (values that are not numbers, such as
    ``None`` or a ``Literal`` alternative, are not bounded)."""
    return dataclasses.field(default=default, metadata={_BOUNDS: _Bounds(ge, gt, le, lt)})


def choices(hint: Any) -> tuple[Any, ...]:
    """The values a ``Literal`` annotation (or an optional one) allows, in order."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return args
    if origin not in (Union, types.UnionType) or not any(get_origin(arg) is Literal for arg in args):
        return ()
    return tuple(value for arg in args for value in (choices(arg) if arg is not type(None) else (None,)))


@dataclass_transform(frozen_default=True, field_specifiers=(option, dataclasses.field))
def options(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen dataclass whose every construction is checked (see the module)."""
    if "__post_init__" in vars(cls):
        raise TypeError(f"{cls.__name__}: an @options class states its rules in check(), not __post_init__")
    cls.__post_init__ = _validate  # type: ignore[attr-defined]  # before dataclass(), which wires it into __init__
    cls = dataclass(frozen=True)(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        _check_keys(type(self).__name__, type(self), kwargs)
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def _check_keys(owner: str, cls: type, keys: Any) -> None:
    """An unknown option is a RecipeError that suggests the closest known field."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known options: {', '.join(known)}"
            raise RecipeError(f"{owner}: unknown option {key!r}{hint}")


def _hooks(obj: Any, name: str) -> None:
    """Each class's own ``name`` method, base classes first, each once."""
    for klass in reversed(type(obj).__mro__):
        method = vars(klass).get(name)
        if method is not None:
            method(obj)


def _validate(obj: Any) -> None:
    cls = type(obj)
    owner = cls.__name__
    _hooks(obj, "normalize")
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        value = _converted(owner, f.name, getattr(obj, f.name), hints[f.name])
        object.__setattr__(obj, f.name, value)
        _check_value(owner, f.name, value, hints[f.name])
        bounds = f.metadata.get(_BOUNDS)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if bounds is not None and numeric and not bounds.holds(value):
            kind = "a number" if _accepts(hints[f.name], float) else "an integer"
            raise RecipeError(f"{owner}.{f.name} must be {kind} {bounds.describe()}, got {value!r}")
    _hooks(obj, "check")


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of ``cls``, once per class."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _converted(owner: str, name: str, value: Any, hint: Any) -> Any:
    """Lists where tuples are declared become tuples; a mapping where an options dataclass is
    declared becomes one (its own unknown keys and types are errors naming ``owner.name``)."""
    if isinstance(value, list) and _accepts(hint, tuple):
        return tuple(value)
    if isinstance(value, Mapping):
        target = next(
            (t for t in _members(hint) if isinstance(t, type) and dataclasses.is_dataclass(t)), None
        )
        if target is not None:
            return nested(f"{owner}.{name}", target, value)
    return value


def nested(path: str, kind: type[T], data: Mapping[str, Any]) -> T:
    """``kind(**data)`` for options given as plain data (a TOML table), its errors naming ``path``
    instead of the class: ``ChannelPruning.options.solver.lr must be a number``."""
    try:
        return kind(**data)
    except RecipeError as error:
        message = str(error)
        if message.startswith(kind.__name__):
            message = path + message[len(kind.__name__) :]
        raise RecipeError(message) from None


def _members(hint: Any) -> tuple[Any, ...]:
    return get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)


def _accepts(hint: Any, kind: type) -> bool:
    return any(get_origin(member) is kind or member is kind for member in _members(hint))


def _check_value(owner: str, name: str, value: Any, hint: Any) -> None:
    allowed = choices(hint)
    if allowed and not _conforms(value, hint):
        others = [m for m in _members(hint) if get_origin(m) is not Literal and m is not type(None)]
        prefix = " or ".join(_describe(m) for m in others) + " or " if others else ""
        raise RecipeError(
            f"{owner}.{name} must be {prefix}one of {', '.join(map(repr, allowed))}; got {value!r}"
        )
    if not _conforms(value, hint):
        raise RecipeError(f"{owner}.{name} must be {_describe(hint)}, got {type(value).__name__} {value!r}")


def _conforms(value: object, hint: Any) -> bool:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if hint in (int, float, bool):
        return _is_number(value, hint)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(item, args[0]) for item in value)
        return len(value) == len(args) and all(map(_conforms, value, args))
    if origin is not None:  # Mapping[...], Callable[...]: the container kind only
        return isinstance(value, origin)
    return not isinstance(hint, type) or isinstance(value, hint)


def _is_number(value: object, hint: type) -> bool:
    """bool is its own kind here: ``ratio=True`` is a mistake, not the number 1."""
    if hint is bool or isinstance(value, bool):
        return hint is bool and isinstance(value, bool)
    return isinstance(value, int) if hint is int else isinstance(value, (int, float))


_NAMES = {int: "an integer", float: "a number", bool: "True or False", str: "a string", type(None): "None"}
_PLURALS = {int: "integers", float: "numbers", str: "strings"}


def _describe(hint: Any) -> str:
    """What a user should write for ``hint``, in words (``tuple[str, ...]``: "a tuple of strings")."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a tuple of {_PLURALS.get(args[0], getattr(args[0], '__name__', str(args[0])))}"
    if origin is tuple and len(set(args)) == 1:
        return f"a tuple of {len(args)} {_PLURALS.get(args[0], str(args[0]))}"
    if hint in _NAMES:
        return _NAMES[hint]
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return f"a {hint.__name__} (or a dict of its fields)"
    return f"a {getattr(hint, '__name__', str(hint))}"
