"""The number formats as torch: reference quantizers and the fake-quant custom ops graphs call.

The int8 scheme is the one the VNNI kernels compute (``lowering/kernels/int8_*.py``):

* **weights**, symmetric int8 per output channel (or one scale for the tensor), offline:
  ``s[n] = max_k |W[n, k]| / 127`` (1 for an all-zero row), ``q = clamp(round(W / s), -127, 127)``;
  the graph holds ``s[n] · q`` (:func:`fake_quant_weight`), the exact grid the kernel packs, and
  zeros (pruned blocks) stay zero. -128 is never used, so ``-q`` fits in int8 too.
* **activations**, asymmetric uint8, because ``vpdpbusd`` multiplies unsigned by signed bytes.
  Dynamic (:func:`quantize_rows`): per row (token) at run time, ``lo = min(0, min x)``,
  ``hi = max(0, max x)``, ``sx = (hi − lo) / 255`` (1 if hi = lo), ``zx = clamp(round(−lo / sx), 0,
  255)``, ``u = clamp(round(x · (1 / sx)) + zx, 0, 255)``; static (:func:`quantize_static`): the
  same with one ``(sx, zx)`` for the tensor, from calibration (:func:`static_params`).
  ``round`` is round-half-to-even and every step is one fp32 operation in the kernel's order,
  so the kernel's codes equal these bit for bit.

The kernel then computes ``sx[m] · sw[n] · (Σ_k u·q − zx[m] · Σ_k q) + b`` with exact int32
sums; the graph computes ``F.linear(sx · (u − zx), s · q, b)`` in fp32, which is the same number
up to fp32 summation order. bf16 is round-to-nearest-even of X and W (:func:`round_bf16`), then
fp32 accumulation, as ``vdpbf16ps`` does.

The custom ops (``torch.library.custom_op``, namespace ``tilefx``) keep the optimized graph
exportable (``torch.export``, the Relax importer's ``custom_convert_map``) and are what lowering
recognises in front of a linear: ``tilefx::fake_quant_rows`` (dynamic int8),
``tilefx::fake_quant_tensor`` (static int8), ``tilefx::round_bf16``. Each computes in fp32 and
returns its input's dtype, so verification's float64 re-run reproduces the same codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

__all__ = [
    "FAKE_QUANT_OPS",
    "QuantizedWeight",
    "fake_quant_rows",
    "fake_quant_rows_ref",
    "fake_quant_tensor",
    "fake_quant_tensor_ref",
    "fake_quant_weight",
    "is_fake_quant",
    "quantize_rows",
    "quantize_static",
    "quantize_weight",
    "round_bf16",
    "round_bf16_ref",
    "static_params",
    "weight_codes",
]

#: Largest int8 weight code: symmetric, so -128 is never used.
WEIGHT_MAX = 127
#: Largest uint8 activation code.
ACT_MAX = 255


@dataclass(frozen=True)
class QuantizedWeight:
    """``W ≈ scales[:, None] · codes``: int8 codes and fp32 scales per output channel."""

    codes: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # float32 [N]

    def dequantized(self) -> torch.Tensor:
        return self.codes.float() * self.scales[:, None]


def quantize_weight(weight: torch.Tensor, per_channel: bool = True) -> QuantizedWeight:
    """Symmetric int8 codes of a ``[N, K]`` weight, one scale per row (or one for all, repeated)."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().expand(w.shape[0])
    scales = torch.where(amax > 0, amax / WEIGHT_MAX, torch.ones_like(amax)).contiguous()
    return QuantizedWeight(weight_codes(w, scales), scales)


def weight_codes(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``clamp(round(W / s), -127, 127)`` as int8, for given per-row scales."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    return torch.clamp(torch.round(w / scales[:, None]), -WEIGHT_MAX, WEIGHT_MAX).to(torch.int8)


def fake_quant_weight(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``s[n] · round(W / s[n])``: the weight on its int8 grid, in fp32 and the weight's shape."""
    codes = weight_codes(weight, scales)
    return (codes.float() * scales[:, None]).reshape(weight.shape).to(weight.dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u uint8 [M, K], sx float32 [M], zx int32 [M])`` of a 2-D ``x``: the kernel's pre-pass."""
    x = x.float()
    lo = torch.clamp(x.amin(dim=1), max=0)
    hi = torch.clamp(x.amax(dim=1), min=0)
    spread = hi - lo
    sx = torch.where(spread > 0, spread / ACT_MAX, torch.ones_like(spread))
    inv = 1 / sx
    zx = torch.clamp(torch.round(-lo * inv), 0, ACT_MAX)
    u = torch.clamp(torch.round(x * inv[:, None]) + zx[:, None], 0, ACT_MAX)
    return u.to(torch.uint8), sx, zx.to(torch.int32)


def static_params(lo: float, hi: float) -> tuple[float, int]:
    """``(scale, zero_point)`` of the asymmetric uint8 grid covering ``[min(lo, 0), max(hi, 0)]``,
    computed in fp32 as :func:`quantize_rows` computes a row's."""
    low = torch.tensor(min(lo, 0.0), dtype=torch.float32)
    spread = torch.tensor(max(hi, 0.0), dtype=torch.float32) - low
    scale = spread / ACT_MAX if float(spread) > 0 else torch.tensor(1.0)
    zero = torch.clamp(torch.round(-low * (1 / scale)), 0, ACT_MAX)
    return float(scale), int(zero)


def quantize_static(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """uint8 codes of ``x`` on a fixed grid (static scheme): ``clamp(round(x · (1/s)) + z, 0, 255)``."""
    inv = 1 / torch.tensor(scale, dtype=torch.float32)
    return torch.clamp(torch.round(x.float() * inv) + zero_point, 0, ACT_MAX).to(torch.uint8)


def fake_quant_rows_ref(x: torch.Tensor) -> torch.Tensor:
    """Dynamic int8 quantize-dequantize over the last dim: ``sx · (u − zx)`` per row, fp32 math."""
    rows = x.reshape(-1, x.shape[-1]) if x.numel() else x.reshape(0, x.shape[-1])
    u, sx, zx = quantize_rows(rows)
    out = sx[:, None] * (u.float() - zx.float()[:, None])
    return out.reshape(x.shape).to(x.dtype)


def fake_quant_tensor_ref(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Static int8 quantize-dequantize: ``s · (u − z)`` on one grid for the tensor, fp32 math."""
    u = quantize_static(x, scale, zero_point)
    return (torch.tensor(scale, dtype=torch.float32) * (u.float() - zero_point)).to(x.dtype)


def round_bf16_ref(x: torch.Tensor) -> torch.Tensor:
    """Round to bfloat16 (nearest even) and back: what the bf16 kernels feed ``vdpbf16ps``."""
    return x.float().to(torch.bfloat16).float().to(x.dtype)


@torch.library.custom_op("tilefx::fake_quant_rows", mutates_args=())
def fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-row int8 fake quantization (:func:`fake_quant_rows_ref`), as one graph node."""
    return fake_quant_rows_ref(x)


@torch.library.custom_op("tilefx::fake_quant_tensor", mutates_args=())
def fake_quant_tensor(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Static per-tensor int8 fake quantization (:func:`fake_quant_tensor_ref`), as one graph node."""
    return fake_quant_tensor_ref(x, scale, zero_point)


@torch.library.custom_op("tilefx::round_bf16", mutates_args=())
def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """bf16 rounding of an fp32 activation (:func:`round_bf16_ref`), as one graph node."""
    return round_bf16_ref(x)


@fake_quant_rows.register_fake
def _fake_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@fake_quant_tensor.register_fake
def _fake_tensor(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.empty_like(x)


@round_bf16.register_fake
def _fake_bf16(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


#: The graph nodes' targets, by (format, scheme): what the pass inserts and lowering folds.
FAKE_QUANT_OPS = {
    ("int8", "dynamic"): torch.ops.tilefx.fake_quant_rows.default,
    ("int8", "static"): torch.ops.tilefx.fake_quant_tensor.default,
    ("bf16", "dynamic"): torch.ops.tilefx.round_bf16.default,
    ("bf16", "static"): torch.ops.tilefx.round_bf16.default,
}


def is_fake_quant(node: torch.fx.Node) -> bool:
    """Whether ``node`` calls one of the fake-quant ops above."""
    return node.op == "call_function" and node.target in _FAKE_QUANT_TARGETS


_FAKE_QUANT_TARGETS = frozenset(FAKE_QUANT_OPS.values())
