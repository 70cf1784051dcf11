"""What every int8 template shares: the VNNI dot product, the fused quantization pre-pass, the epilogue.

The scheme is ``passes.quant_ops``' (asymmetric uint8 activations, symmetric int8 weights, int32
accumulation). Every int8 kernel takes fp32 X and writes fp32 Y, so it drops in where the fp32
kernels sit, and is one PrimFunc in three phases:

1. :func:`quantize_rows`: X → ``Xq`` uint8 ``[Mp, K]`` plus ``sx``/``zx`` per row, one parallel
   pass over rows (dynamic: each row's own range; static: one grid from the ``aq`` argument);
2. the GEMM, a parallel loop over tasks, each holding its output tile's int32 accumulators in
   zmm registers across the reduction, one :func:`vnni_dot` per 16 lanes × 4 k;
3. the epilogue (:func:`dequantize`), fused into each task:
   ``Y = act(sx[m] · sw[n] · (acc − zx[m] · cs[n]) + b[n])`` with ``cs[n] = Σ_k q[n, k]``
   precomputed at packing, so the zero point costs one rank-1 int32 term.

int32 cannot overflow: ``|acc| ≤ 255 · 127 · K < 2³¹`` for K < 66 000 (the plan checks K).

Why the intrinsic is called by hand: TVM 0.27 ships ``dot_16x4_vnni`` as a tensor intrinsic
(``tvm.s_tir.tensor_intrin.x86``), but it passes ``int32x16`` operands and the bundled LLVM 22
declares ``llvm.x86.avx512.vpdpbusd.512`` on ``<64 x i8>``, so LLVM's verifier rejects it; and
``tensorize`` needs affine loops, which ragged ``indptr`` loops are not. A plain
``i32(u8) · i32(s8)`` loop does not become ``vpdpbusd`` either (LLVM widens to 16 bits and emits
``vpdpwssd``, half the work per instruction). ``T.call_llvm_pure_intrin`` with the operands
``T.reinterpret``-ed to ``uint8x64``/``int8x64`` (TVM maps those to LLVM ``i8`` vectors) gives one
``vpdpbusd zmm`` per call; the tests check the assembly. Rounding uses ``T.round`` (LLVM
``nearbyint``, round half to even like ``torch.round``), which vectorises; ``T.nearbyint`` is not
vectorised by TVM 0.27.
"""

from __future__ import annotations

from typing import Any

from tvm.script import tirx as T

__all__ = ["K_ALIGN", "MAX_K", "dequantize", "quantize_rows", "vnni_dot"]

#: The pre-pass reads rows in 16-float vectors: int8 kernels need K % 16 == 0.
K_ALIGN = 16
#: Largest reduction whose int32 accumulators cannot overflow (255 · 127 · K < 2³¹).
MAX_K = (2**31 - 1) // (255 * 127)


def vnni_dot(acc: Any, x_u8: Any, w_s8: Any) -> Any:
    """``acc + dot4(x_u8, w_s8)`` per int32 lane: one ``vpdpbusd zmm``; operands are int32x16 words."""
    return T.call_llvm_pure_intrin(
        "int32x16",
        "llvm.x86.avx512.vpdpbusd.512",
        acc,
        T.reinterpret("uint8x64", x_u8),
        T.reinterpret("int8x64", w_s8),
    )


def dequantize(acc: Any, zx: Any, cs: Any, sx: Any, sw: Any, bias: Any) -> Any:
    """The int8 epilogue before the activation: ``sx · sw · (acc − zx · cs) + b`` in fp32."""
    return T.Cast("float32", acc - zx * cs) * (sx * sw) + bias


@T.macro
def quantize_rows(X, aq, Xq, sx, zx, m_rows, k_cols, m_pad, static):  # type: ignore[no-untyped-def]
    """``Xq[m, :]`` = uint8 codes of row m, ``sx[m]``, ``zx[m]``; rows ≥ ``m_rows`` are zero.

    Dynamic (``static`` False): per row, vectorised min/max into 16-lane accumulators reduced
    once, then ``sx = (hi − lo)/255`` (1 if hi = lo), ``zx = clamp(round(−lo/sx), 0, 255)``.
    Static: ``sx = aq[0]``, ``zx = aq[1]`` for every row. Codes ``clamp(round(x · (1/sx)) + zx,
    0, 255)``. Every step is the fp32 operation ``passes.quant_ops`` performs, in its order, so
    the codes equal the reference's bit for bit. Requires ``k_cols % 16 == 0``.
    """
    for m in T.parallel(m_pad):
        if m < m_rows:
            red = T.alloc_buffer((4,), "float32", scope="local")  # lo, hi, scale, 1 / scale
            if static:
                red[2] = aq[0]
            else:
                lo = T.alloc_buffer((16,), "float32", scope="local")
                hi = T.alloc_buffer((16,), "float32", scope="local")
                for j in T.vectorized(16):
                    lo[j] = T.float32(0)
                    hi[j] = T.float32(0)
                for kb in range(k_cols // 16):
                    for j in T.vectorized(16):
                        lo[j] = T.min(lo[j], X[m, kb * 16 + j])
                        hi[j] = T.max(hi[j], X[m, kb * 16 + j])
                red[0] = T.float32(0)
                red[1] = T.float32(0)
                for j in range(16):
                    red[0] = T.min(red[0], lo[j])
                    red[1] = T.max(red[1], hi[j])
                red[2] = T.if_then_else(
                    red[1] - red[0] > T.float32(0), (red[1] - red[0]) / T.float32(255), T.float32(1)
                )
            red[3] = T.float32(1) / red[2]
            sx[m] = red[2]
            if static:
                red[0] = aq[1]
            else:
                red[0] = T.max(T.min(T.round(-red[0] * red[3]), T.float32(255)), T.float32(0))
            zx[m] = T.Cast("int32", red[0])
            for kb in range(k_cols // 16):
                for j in T.vectorized(16):
                    Xq[m, kb * 16 + j] = T.Cast(
                        "uint8",
                        T.max(
                            T.min(T.round(X[m, kb * 16 + j] * red[3]) + red[0], T.float32(255)),
                            T.float32(0),
                        ),
                    )
        else:
            sx[m] = T.float32(0)
            zx[m] = 0
            for kb in range(k_cols // 16):
                for j in T.vectorized(16):
                    Xq[m, kb * 16 + j] = T.uint8(0)
