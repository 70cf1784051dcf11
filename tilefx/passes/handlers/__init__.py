"""Per-op knowledge of how channel identities flow, keyed by ATen op overload.

A handler takes the node and a :class:`~tilefx.passes.handlers.api.Context` and returns what the
node's output carries (:data:`~tilefx.passes.handlers.api.NodeValue`: ``Channels``, a
``ParamRef``, a list for multi-output ops, or None when the output carries no channel
identity). Through the context it declares couplings (``union``), parameter slices (``use``),
channels that may never be removed (``freeze``) and argument rewrites to apply after pruning
(``on_prune``). The API lives in ``api.py``, the table in ``registry.py``; each family below
registers into the table with ``@handles(...)``.

Importing this package registers every handler family, so ``HANDLERS`` from here is complete.
"""

from __future__ import annotations

from . import attention, elementwise, layers, norms, opaque, shape_ops  # noqa: F401  (registration)
from .registry import HANDLERS, Handler, handles

__all__ = ["HANDLERS", "Handler", "handles"]
