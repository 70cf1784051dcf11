"""Small nn.Modules that run one compiled block-sparse kernel from torch.

Tensors reach the kernel through DLPack (tvm-ffi accepts torch tensors directly): no copies,
the kernel reads the torch input and writes a torch output it is handed. The packed BSR arrays
are registered buffers, so ``state_dict`` and ``.to()`` see them like any other weight.

Kernels are specialised to an input shape. The module holds the one it was compiled for and
asks ``kernel_for`` (supplied by ``tilefx.lowering.build``, which caches) for other batch
sizes, so a model compiled at batch 128 still runs at batch 1. The runtime never imports the
lowering package itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..passes.infra.errors import LoweringError
from .packing import BsrWeight

__all__ = ["BsrConv2d", "BsrLinear", "Kernel", "KernelFactory"]

#: Byte alignment TVM assumes for buffer data (``tvm.tirx`` default ``data_alignment``).
_ALIGNMENT = 64
#: A compiled kernel: (X, W_data, W_indices, W_indptr, bias, Y) -> None, Y written in place.
Kernel = Callable[..., Any]
#: Compiles (or fetches from the cache) the kernel for one input shape.
KernelFactory = Callable[[tuple[int, ...]], Kernel]


class _BsrModule(torch.nn.Module):
    """Shared state: packed weight, bias (zeros when the layer had none), kernels per input shape."""

    w_data: torch.Tensor
    w_indices: torch.Tensor
    w_indptr: torch.Tensor
    bias: torch.Tensor

    def __init__(self, weight: BsrWeight, bias: torch.Tensor | None, kernel_for: KernelFactory) -> None:
        super().__init__()
        self.register_buffer("w_data", weight.data)
        self.register_buffer("w_indices", weight.indices)
        self.register_buffer("w_indptr", weight.indptr)
        zeros = torch.zeros(weight.shape[0], dtype=torch.float32)
        self.register_buffer("bias", (bias.detach().clone() if bias is not None else zeros).contiguous())
        self.block = weight.block
        self.out_features, self.in_features = weight.shape
        self._kernel_for = kernel_for
        self._kernels: dict[tuple[int, ...], Kernel] = {}

    def kernel(self, shape: tuple[int, ...]) -> Kernel:
        """The compiled kernel for inputs of ``shape``, compiled (or fetched) on first use."""
        kernel = self._kernels.get(shape)
        if kernel is None:
            kernel = self._kernels[shape] = self._kernel_for(shape)
        return kernel

    def _check_input(self, x: torch.Tensor, ok: bool, expected: str) -> None:
        if x.dtype != torch.float32:
            raise LoweringError(f"{type(self).__name__}: input must be float32, got {x.dtype}")
        if not ok:
            raise LoweringError(
                f"{type(self).__name__}: input shape {tuple(x.shape)} does not match {expected}"
            )

    def _run(self, x: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
        x = x.contiguous()
        if x.data_ptr() % _ALIGNMENT:  # a view into a larger tensor; TVM buffers assume alignment
            x = x.clone()
        y = torch.empty(out_shape, dtype=torch.float32, device=x.device)
        self.kernel(tuple(x.shape))(x, self.w_data, self.w_indices, self.w_indptr, self.bias, y)
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, block={self.block}, nnzb={int(self.w_indptr[-1])}"


class BsrLinear(_BsrModule):
    """``act(x @ Wᵀ + b)`` for x of shape ``[..., in_features]``; leading dims are flattened."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, x.dim() >= 1 and x.shape[-1] == self.in_features, f"[..., {self.in_features}]")
        rows = x.reshape(-1, self.in_features)
        y = self._run(rows, (rows.shape[0], self.out_features))
        return y.reshape(*x.shape[:-1], self.out_features)


class BsrConv2d(_BsrModule):
    """``act(conv2d(x, W, b))`` for NCHW x; stride/padding/dilation are baked into the kernel."""

    def __init__(
        self,
        weight: BsrWeight,
        bias: torch.Tensor | None,
        kernel_for: KernelFactory,
        *,
        in_channels: int,
        output_hw: Callable[[int, int], tuple[int, int]],
    ) -> None:
        super().__init__(weight, bias, kernel_for)
        self.in_channels = in_channels
        self._output_hw = output_hw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(
            x, x.dim() == 4 and x.shape[1] == self.in_channels, f"[N, {self.in_channels}, H, W]"
        )
        oh, ow = self._output_hw(x.shape[2], x.shape[3])
        return self._run(x, (x.shape[0], self.out_features, oh, ow))
