"""One error hierarchy for the whole compiler.

Every error a user can see derives from :class:`OptimizeError`, so a deployment pipeline can catch
one type. Messages name the pass, the node or parameter, and the fix.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "ArtifactInputError",
    "CaptureError",
    "LoweringError",
    "OptimizeError",
    "PassError",
    "PreconditionError",
    "RecipeError",
    "UnsupportedOpError",
    "VerificationError",
    "WeightError",
]


class OptimizeError(Exception):
    """Base of every error tilefx raises on purpose."""


class CaptureError(OptimizeError):
    """The model could not be captured into an ATen-level fx graph (torch.export failed)."""


class UnsupportedOpError(OptimizeError):
    """A pass met an op it has no handler for; the message names the node and how to skip it."""

    def __init__(self, message: str, node: str | None = None, target: str | None = None) -> None:
        super().__init__(message)
        self.node = node
        self.target = target


class VerificationError(OptimizeError):
    """A pass produced a graph that is malformed or numerically different from what it claims."""


class PreconditionError(OptimizeError):
    """A pass was handed a graph its ``Requires:`` rules out; names the pass, the node and the fix."""

    def __init__(self, pass_name: str, node: str, problem: str, fix: str) -> None:
        super().__init__(f"{pass_name}: {node!r} {problem}; {fix}")
        self.node = node


class PassError(OptimizeError):
    """A pass raised; names the pass and the passes that ran before it. The cause is chained."""

    def __init__(self, pass_name: str, previous: list[str], cause: BaseException) -> None:
        ran = ", ".join(previous) if previous else "none"
        # Not super(): in a wrapped type (see wrap) the next class is the cause's, with its own signature.
        OptimizeError.__init__(self, f"pass {pass_name!r} failed (passes run before it: {ran}): {cause}")
        self.pass_name = pass_name
        self.previous = list(previous)
        self.cause = cause

    @classmethod
    def wrap(cls, pass_name: str, previous: list[str], cause: BaseException) -> PassError:
        """A PassError that is also an instance of ``cause``'s tilefx type.

        So ``except UnsupportedOpError`` still catches an unsupported op met inside a pipeline,
        while the message gains the pass context. Foreign exceptions (bugs) become plain PassErrors.
        """
        kind: type[PassError] = cls
        if isinstance(cause, OptimizeError) and not isinstance(cause, PassError):
            kind = _in_pass(type(cause))
        error = kind.__new__(kind)
        PassError.__init__(error, pass_name, previous, cause)
        error.__dict__.update(
            {k: v for k, v in vars(cause).items() if k not in ("pass_name", "previous", "cause")}
        )
        return error


_IN_PASS: dict[type, type[PassError]] = {}


def _in_pass(kind: type[OptimizeError]) -> type[PassError]:
    if kind not in _IN_PASS:
        _IN_PASS[kind] = type(kind.__name__, (PassError, kind), {"__module__": kind.__module__})
    return _IN_PASS[kind]


class RecipeError(OptimizeError, ValueError):
    """A recipe option is unknown or out of range; the message names the field."""


class LoweringError(OptimizeError):
    """Lowering to TVM cannot handle this graph, weight, dtype or target."""


class WeightError(OptimizeError, ValueError):
    """A weight cannot be used as given (NaN or inf entries); the message names the parameter."""


class ArtifactError(OptimizeError):
    """An exported artifact cannot be loaded: missing, corrupted, or built for another TVM or CPU."""


class ArtifactInputError(ArtifactError, ValueError):
    """An artifact was called with inputs of the wrong number, shape or dtype; names the input."""
