"""The handler table: for each ATen op overload, the function that knows how channels flow through it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.fx
from torch._ops import OpOverload

from .api import Context, NodeValue

__all__ = ["HANDLERS", "Handler", "handles"]

Handler = Callable[[torch.fx.Node, Context], NodeValue]
HANDLERS: dict[OpOverload, Handler] = {}

H = TypeVar("H", bound=Handler)


def handles(*targets: OpOverload) -> Callable[[H], H]:
    """Register the decorated handler for every op overload in ``targets``."""

    def register(fn: H) -> H:
        for target in targets:
            HANDLERS[target] = fn
        return fn

    return register
