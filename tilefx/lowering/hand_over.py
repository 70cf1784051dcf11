"""Which lowered linears hand their output token-major to the next: a decision recorded in the plan.

A lowered linear whose readers are all lowered linears that take ``Xᵀ`` may write ``Yᵀ``
instead (``runtime.sparse_modules``), so FFN1 → GELU → FFN2 skips a transpose on each side.
It is decided after every layer's kernel-or-torch choice (``lowering.fallback``): a reader
kept dense would still be correct (torch accepts any strides) but would pay for the layout.
With ``fallback="measure"`` the layer and its readers are timed both ways on the layer's input
shape and the hand-over is kept only if strictly faster (the schedules' rule of thumb comes
from BERT shapes on two machines). The outcome is ``SparseLayer.transposed_output`` in a new
plan, and the layer's runtime module is built from it; TVM-free, like the plan.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from ..runtime.sparse_modules import BsrConv2d, BsrLinear
from .fallback import Fallback, Timer, median_of
from .plan import SparseLayer

__all__ = ["ModuleBuilder", "decide_hand_overs"]

log = logging.getLogger(__name__)

#: Builds the runtime module of one planned layer (``lowering.build``), kernels from its cache.
ModuleBuilder = Callable[[SparseLayer], BsrLinear | BsrConv2d]


def decide_hand_overs(
    layers: Sequence[SparseLayer],
    lowered: Mapping[str, BsrLinear | BsrConv2d],
    build: ModuleBuilder,
    policy: Fallback,
    timer: Timer,
) -> tuple[tuple[SparseLayer, ...], dict[str, BsrLinear | BsrConv2d]]:
    """``layers`` with ``transposed_output`` decided, and the ``lowered`` modules built from them.

    Readers are decided first (reverse graph order), so a layer is timed against its readers as
    they will run. Compiles the transposed kernels now.
    """
    decided = list(layers)
    modules = dict(lowered)
    for i in reversed(range(len(decided))):
        layer = decided[i]
        readers = _token_major_readers(layer, modules)
        if readers is None:
            continue
        handing = dataclasses.replace(layer, transposed_output=True)
        module = build(handing)
        if policy == "measure" and not _hand_over_is_faster(
            layer, modules[layer.node], module, readers, timer
        ):
            continue
        log.debug("node %s hands Yᵀ to %s", layer.node, layer.consumers)
        decided[i], modules[layer.node] = handing, module
    return tuple(decided), modules


def _token_major_readers(
    layer: SparseLayer, modules: Mapping[str, BsrLinear | BsrConv2d]
) -> list[BsrLinear] | None:
    """The modules of ``layer``'s readers if it can write Yᵀ and every one can read Xᵀ, else None."""
    module = modules.get(layer.node)
    if not isinstance(module, BsrLinear) or not layer.consumers:
        return None
    rows = math.prod(layer.input_shape[:-1])
    if module.transposed_kernel(rows, False, True) is None:
        return None
    readers = []
    for name in layer.consumers:
        reader = modules.get(name)
        if (
            not isinstance(reader, BsrLinear)
            or reader.transposed_kernel(rows, True, reader.transposed_output) is None
        ):
            return None
        readers.append(reader)
    return readers


def _hand_over_is_faster(
    layer: SparseLayer,
    row_major: BsrLinear | BsrConv2d,
    handing: BsrLinear | BsrConv2d,
    readers: list[BsrLinear],
    timer: Timer,
) -> bool:
    """Time the layer and its readers with ``Yᵀ`` handed over and row-major (torch ops between omitted)."""
    x = torch.randn(layer.input_shape)

    def chain(writer: torch.nn.Module) -> Callable[[], object]:
        def call() -> object:
            y = writer(x)
            return [reader(y) for reader in readers]

        return call

    timed = timer({"hand-over": chain(handing), "row-major": chain(row_major)})
    handed, plain = median_of(timed["hand-over"]), median_of(timed["row-major"])
    log.info("node %s: hand-over %.3f ms, row-major %.3f ms (medians)", layer.node, handed, plain)
    return handed < plain
