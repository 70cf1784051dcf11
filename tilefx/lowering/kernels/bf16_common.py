"""What the bf16 templates share: AVX512-BF16's conversion and dot product, as TVM 0.27 allows them.

``vdpbf16ps`` (:func:`dot_bf16`): 16 fp32 lanes, each += the dot of 2 bf16 pairs. Its operands
can only come from an intrinsic that *returns* ``<32 x bfloat>``: TVM 0.27 types every bf16
value it loads from memory as ``i16``, which LLVM 22's declaration rejects, and the
``BF16ComputeLegalize`` pass (always in the pipeline) promotes reinterpreted bf16 arguments to
fp32. What works, in the default pipeline, is converting fp32 to bf16 in registers with
``vcvtne2ps2bf16`` (:func:`cvt_bf16`, round to nearest even like torch's ``.bfloat16()``) and
feeding its result straight to the dot: the pass retypes the call in TIR, but the LLVM value
keeps the intrinsic's bfloat type. So the kernels read fp32 X and W and convert in the inner
loop, sharing each conversion among several dots. This relies on a codegen detail (disabling
the pass makes the same build segfault); ``tests/lowering/test_quantized_kernels.py`` builds
the probe so a TVM upgrade that breaks it fails loudly. The fix that would make bf16 loads
first-class is in TVM (``CodeGenLLVM::CreateIntrinsic`` bitcasting same-width arguments).
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import tirx
from tvm.script import tirx as T

__all__ = ["bf16_pair", "cvt_bf16", "dot_bf16", "round_bf16_func"]


def cvt_bf16(lo: Any, hi: Any) -> Any:
    """32 bf16 = round(lo[0:16]) ++ round(hi[0:16]) (nearest even), as an LLVM ``<32 x bfloat>``."""
    return T.call_llvm_pure_intrin("bfloat16x32", "llvm.x86.avx512bf16.cvtne2ps2bf16.512", hi, lo)


def bf16_pair(v32: Any, p: int) -> Any:
    """Pair ``p`` (elements 2p, 2p+1) of a 32-element bf16 vector, repeated in all 16 dwords."""
    return tirx.Shuffle([v32], [2 * p + (i % 2) for i in range(32)])


def dot_bf16(acc: Any, a: Any, b: Any) -> Any:
    """``acc[i] += a[2i]·b[2i] + a[2i+1]·b[2i+1]`` in fp32: one ``vdpbf16ps zmm``."""
    return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512bf16.dpbf16ps.512", acc, a, b)


def round_bf16_func(size: int) -> tvm.tirx.PrimFunc:
    """``Y = bf16(X)`` kept fp32, rounded to nearest even on the bits as torch's ``.bfloat16()``
    does (for a bf16 fake-quant node no kernel absorbs; Relax's own bf16 cast rounds otherwise).
    One spatial block, so Relax's pattern analysis can read it."""

    @T.prim_func(s_tir=True)
    def main(X: T.Buffer((size,), "float32"), Y: T.Buffer((size,), "float32")) -> None:
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for i in range(size):
            with T.sblock("round_bf16"):
                v = T.axis.spatial(size, i)
                Y[v] = T.reinterpret(
                    "float32",
                    T.bitwise_and(
                        T.reinterpret("uint32", X[v])
                        + T.uint32(0x7FFF)
                        + T.bitwise_and(
                            T.shift_right(T.reinterpret("uint32", X[v]), T.uint32(16)), T.uint32(1)
                        ),
                        T.uint32(0xFFFF0000),
                    ),
                )

    return main
