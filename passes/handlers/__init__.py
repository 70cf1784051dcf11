"""Per-op knowledge of how channel identities flow, keyed by ATen op overload.

A handler takes the node and a :class:`~tilefx.passes.analysis.channel_groups.Context` and returns
the channel identities of the node's output (``Channels``, a list for multi-output ops, or None
when the output carries no channel identity). Through the context it declares couplings
(``union``), parameter slices (``use``), channels that may never be removed (``freeze``) and
argument rewrites to apply after pruning (``on_prune``).

Importing this package registers every handler family below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["HANDLERS", "Handler", "handles"]

Handler = Callable[[Any, Any], Any]
HANDLERS: dict[Any, Handler] = {}


def handles(*targets: Any) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for target in targets:
            HANDLERS[target] = fn
        return fn

    return register


from . import attention, elementwise, layers, norms, opaque, shape_ops  # noqa: E402,F401  (registration)
