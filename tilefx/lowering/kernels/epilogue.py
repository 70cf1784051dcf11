"""Fused activation epilogues, applied to each output vector before it is stored.

Fusing saves a pass over Y: for BERT's FFN1 the separate torch GELU read and wrote 1.5 MB and
took 0.1–0.2 ms (2 threads), a fifth of the sparse block at 90%. ``T.erf`` lowers to one
scalar ``erff`` call per element on LLVM CPU targets, which undoes the vectorisation, so GELU
uses a rational approximation written here instead: ``erf(x) ≈ x·P(x²)/Q(x²)`` on
``|x| ≤ 3.92`` (clamped outside, where fp32 erf is ±1), with P of degree 6 and Q of degree 4
in ``x²``, fitted by iterated weighted least squares against ``math.erf``. Maximum absolute
error evaluated in fp32: 3.9e-7 over [-6, 6], which the equivalence tests' 1e-4 tolerance
leaves far behind (``tests/lowering/test_bsr_kernels.py`` checks it against ``torch.erf``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tvm.script import tirx as T

from .spec import Activation

__all__ = ["activation", "erf"]

_ERF_CLAMP = 3.92
_ERF_P = (
    1.128378887153165,
    0.19911151202366958,
    0.05046882660197728,
    0.00368410184149309,
    0.00014287315407902071,
    -1.9926644229018198e-06,
    2.0478810954861065e-08,
)
_ERF_Q = (1.0, 0.5097879224800616, 0.11466941629162128, 0.01429510707943811, 0.0009567567745110069)


def _horner(coefficients: tuple[float, ...], z):  # type: ignore[no-untyped-def]
    value = T.float32(coefficients[-1])
    for c in reversed(coefficients[:-1]):
        value = value * z + T.float32(c)
    return value


def erf(v):  # type: ignore[no-untyped-def]
    """``erf(v)`` as a vectorisable PrimExpr (see the module docstring for its accuracy)."""
    x = T.max(T.min(v, T.float32(_ERF_CLAMP)), T.float32(-_ERF_CLAMP))
    z = x * x
    return x * _horner(_ERF_P, z) / _horner(_ERF_Q, z)


def activation(kind: Activation | None) -> Callable[[Any], Any]:
    """The epilogue for ``kind`` (None: identity), applied to PrimExprs while a template is parsed."""
    if kind == "relu":
        return lambda v: T.max(v, T.float32(0))
    if kind == "gelu":  # torch's exact GELU: x·Φ(x) = x/2 · (1 + erf(x/√2))
        return lambda v: v * T.float32(0.5) * (T.float32(1) + erf(v * T.float32(0.7071067811865476)))
    if kind is None:
        return lambda v: v
    raise ValueError(f"unknown activation {kind!r}: choose relu or gelu")
