"""Small nn.Modules that run one compiled block-sparse kernel from torch.

Tensors reach the kernel through DLPack (tvm-ffi accepts torch tensors directly): no copies,
the kernel reads the torch input and writes a torch output it is handed. The packed BSR arrays
are registered buffers, so ``state_dict`` and ``.to()`` see them like any other weight.

Kernels are specialised to an input shape. The module holds the one it was compiled for and
asks ``kernel_for`` (supplied by ``tilefx.lowering.build``, which caches) for other batch
sizes, so a model compiled at batch 128 still runs at batch 1. The runtime never imports the
lowering package itself.

Layouts between sparse linear layers: a ``BsrLinear`` whose output reaches only other sparse
linears (directly, or through elementwise ops) may be built to return ``Yᵀ`` stored ``[N, P]``
(``P = runtime.layout.token_pitch(M)``), as a transposed view of shape ``[M, N]``. The next
``BsrLinear`` recognises that layout and hands it to a kernel that reads ``Xᵀ`` where it lies.
The token-major kernels compute in that layout anyway, so FFN1 → GELU → FFN2 (GELU fused into
FFN1's epilogue) skips transposing out of FFN1 and back into FFN2. Any other input layout is
made contiguous, so the result never depends on who produced the input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tilefx.errors import LoweringError

from .layout import token_pitch
from .packing import BsrWeight, NarrowWeight

__all__ = ["BsrConv2d", "BsrLinear", "Kernel", "KernelFactory", "NarrowLinear", "TransposedFactory"]

#: Byte alignment TVM assumes for buffer data (``tvm.tirx`` default ``data_alignment``).
_ALIGNMENT = 64


#: A compiled kernel: (X, W_data, W_indices, W_indptr, bias, Y) -> None, Y written in place.
Kernel = Callable[..., Any]
#: Compiles (or fetches from the cache) the kernel for one input shape.
KernelFactory = Callable[[tuple[int, ...]], Kernel]
#: The kernel for (rows M, Xᵀ given, Yᵀ wanted), or None where no kernel computes in that layout.
TransposedFactory = Callable[[int, bool, bool], "Kernel | None"]


class _KernelModule(torch.nn.Module):
    """What every kernel-calling module shares: kernels per input shape, input checks, alignment."""

    def __init__(self, kernel_for: KernelFactory) -> None:
        super().__init__()
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

    @staticmethod
    def _aligned(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if x.data_ptr() % _ALIGNMENT:  # a view into a larger tensor; TVM buffers assume alignment
            x = x.clone()
        return x


class _BsrModule(_KernelModule):
    """Shared state: packed weight, bias (zeros when the layer had none), kernels per input shape."""

    w_data: torch.Tensor
    w_indices: torch.Tensor
    w_indptr: torch.Tensor
    bias: torch.Tensor

    def __init__(self, weight: BsrWeight, bias: torch.Tensor | None, kernel_for: KernelFactory) -> None:
        super().__init__(kernel_for)
        self.register_buffer("w_data", weight.data)
        self.register_buffer("w_indices", weight.indices)
        self.register_buffer("w_indptr", weight.indptr)
        zeros = torch.zeros(weight.shape[0], dtype=torch.float32)
        self.register_buffer("bias", (bias.detach().clone() if bias is not None else zeros).contiguous())
        self.block = weight.block
        self.out_features, self.in_features = weight.shape

    def _run(self, x: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
        x = self._aligned(x)
        y = torch.empty(out_shape, dtype=torch.float32, device=x.device)
        self.kernel(tuple(x.shape))(x, self.w_data, self.w_indices, self.w_indptr, self.bias, y)
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, block={self.block}, nnzb={int(self.w_indptr[-1])}"


class BsrLinear(_BsrModule):
    """``act(x @ Wᵀ + b)`` for x of shape ``[..., in_features]``; leading dims are flattened.

    With ``transposed_for`` it also runs kernels that read ``Xᵀ`` / write ``Yᵀ`` (see the module
    docstring). ``transposed_output`` asks for ``Yᵀ`` where a kernel writes it: the compiler's
    decision (``SparseLayer.transposed_output`` in the lowering plan), fixed at construction.
    """

    def __init__(
        self,
        weight: BsrWeight,
        bias: torch.Tensor | None,
        kernel_for: KernelFactory,
        transposed_for: TransposedFactory | None = None,
        *,
        transposed_output: bool = False,
    ) -> None:
        super().__init__(weight, bias, kernel_for)
        self._transposed_for = transposed_for
        self._variants: dict[tuple[int, bool, bool], Kernel | None] = {}
        self._transposed_output = transposed_output

    @property
    def transposed_output(self) -> bool:
        """Whether this layer returns ``Yᵀ`` (as a transposed view) where a kernel writes it."""
        return self._transposed_output

    def transposed_kernel(self, rows: int, x_transposed: bool, y_transposed: bool) -> Kernel | None:
        """The kernel for ``rows`` inputs in that layout, or None where there is none."""
        key = (rows, x_transposed, y_transposed)
        if key not in self._variants:
            factory = self._transposed_for
            self._variants[key] = factory(*key) if factory is not None else None
        return self._variants[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, x.dim() >= 1 and x.shape[-1] == self.in_features, f"[..., {self.in_features}]")
        rows = x.reshape(-1, self.in_features)
        m = rows.shape[0]
        xt = _transposed_storage(rows)
        y_t = self.transposed_output
        kernel = self.transposed_kernel(m, xt is not None, y_t) if xt is not None or y_t else None
        if kernel is None:
            y = self._run(rows, (m, self.out_features))
        else:
            shape = (self.out_features, token_pitch(m)) if y_t else (m, self.out_features)
            y = torch.empty(shape, dtype=torch.float32, device=x.device)
            src = xt if xt is not None else self._aligned(rows)
            kernel(src, self.w_data, self.w_indices, self.w_indptr, self.bias, y)
            y = y[:, :m].T if y_t else y
        return y.reshape(*x.shape[:-1], self.out_features)


def _transposed_storage(rows: torch.Tensor) -> torch.Tensor | None:
    """Xᵀ as ``[K, pitch]`` for a token-major input ``rows`` [M, K]; None for other layouts.

    In place when ``rows`` is a ``BsrLinear`` output (strides ``(1, pitch)``, aligned, storage
    for the padding columns). A torch op between two sparse linears (an unfused activation)
    keeps the layout but drops the padding (strides ``(1, M)``): then the M-float rows are copied
    into a padded buffer, which is cheaper than transposing them back (a copy of BERT's
    128 × 3072 activation takes ~0.05 ms; torch's transposing copy took 0.3 ms).
    """
    m, k = rows.shape
    pitch = token_pitch(m)
    if rows.is_contiguous() or rows.stride(0) != 1:
        return None
    if rows.stride(1) == pitch and rows.data_ptr() % _ALIGNMENT == 0:
        end = rows.storage_offset() + k * pitch
        if end <= rows.untyped_storage().nbytes() // rows.element_size():
            return rows.as_strided((k, pitch), (pitch, 1))
    if rows.stride(1) != m:
        return None
    padded = torch.empty((k, pitch), dtype=torch.float32, device=rows.device)
    padded[:, :m] = rows.T
    return padded


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


class NarrowLinear(_KernelModule):
    """``act(x @ Wᵀ + b)`` by an int8 or bf16 kernel (dense or block-sparse), for x ``[..., in]``.

    X stays fp32 across the call: the kernel quantizes it (int8) or rounds it (bf16) itself, so
    nothing new crosses DLPack and callers see an fp32 layer. The packed arrays
    (:class:`~tilefx.runtime.packing.NarrowWeight`: codes or pair panels, scales, column sums,
    the static grid) are buffers ``w_0``, ``w_1``, ... in the kernel's argument order; the
    kernel is called ``kernel(X, w_0, ..., bias, Y)``.
    """

    bias: torch.Tensor

    def __init__(self, weight: NarrowWeight, bias: torch.Tensor | None, kernel_for: KernelFactory) -> None:
        super().__init__(kernel_for)
        self._names: list[str] = []
        for index, array in enumerate(weight.arrays):
            self.register_buffer(f"w_{index}", array.contiguous())
            self._names.append(f"w_{index}")
        zeros = torch.zeros(weight.shape[0], dtype=torch.float32)
        self.register_buffer("bias", (bias.detach().clone() if bias is not None else zeros).contiguous())
        self.out_features, self.in_features = weight.shape
        self.number_format = weight.number_format
        self.layout = weight.layout
        self.block = weight.block
        self.nnzb = weight.nnzb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, x.dim() >= 1 and x.shape[-1] == self.in_features, f"[..., {self.in_features}]")
        rows = self._aligned(x.reshape(-1, self.in_features))
        y = torch.empty((rows.shape[0], self.out_features), dtype=torch.float32, device=x.device)
        arrays = [getattr(self, name) for name in self._names]
        self.kernel(tuple(rows.shape))(rows, *arrays, self.bias, y)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = "dense" if self.layout == "dense" else f"block={self.block}, nnzb={self.nnzb}"
        return f"{self.number_format}, in={self.in_features}, out={self.out_features}, {kind}"
