"""int8 and bf16 kernels equal the torch fake-quant reference of ``passes.quant_ops``.

int8: the quantization pre-pass is bit-exact (so the codes are the reference's), the int32
accumulators are exact, and the rest is fp32 rounding in the epilogue, so every output lies
within a small fraction of one quantization step ``sx[m] · sw[n]`` of ``F.linear`` on the
fake-quantized X and W (a wrong accumulator would be a whole step off). bf16: within 1e-5 of
max |Y| of float64 on bf16-rounded X and W (exact bf16 products, fp32 sums). Shapes are small;
ragged M (not a multiple of any tile) is in every grid. Skipped where the CPU lacks the feature.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tilefx.lowering import compat
from tilefx.lowering.kernels.spec import Conv2dGeometry, KernelSpec
from tilefx.lowering.schedules.cpu import narrow_kernel
from tilefx.passes import quant_ops as Q
from tilefx.runtime.packing import pack_bf16_bsr, pack_bf16_dense, pack_int8_bsr, pack_int8_dense

TARGET = compat.make_target("llvm")
FEATURES = compat.cpu_features(TARGET)
needs_vnni = pytest.mark.skipif("avx512vnni" not in FEATURES, reason="CPU has no AVX512-VNNI")
needs_bf16 = pytest.mark.skipif("avx512bf16" not in FEATURES, reason="CPU has no AVX512-BF16")


def _weight(
    n: int, k: int, block: tuple[int, int] | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    if block is None:
        return w, None
    r, c = block
    mask = torch.rand(n // r, k // c, generator=gen) < 0.4
    mask[0] = False  # an empty block row
    mask[1] = True  # a full one
    return w * mask.repeat_interleave(r, 0).repeat_interleave(c, 1), mask


def _activate(y: torch.Tensor, act: str | None) -> torch.Tensor:
    return F.gelu(y) if act == "gelu" else torch.relu(y) if act == "relu" else y


def _int8(
    m: int, k: int, n: int, block: tuple[int, int] | None, act: str | None, static: bool, seed: int = 0
):  # type: ignore[no-untyped-def]
    w, mask = _weight(n, k, block, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = F.gelu(torch.randn(m, k, generator=gen) * 3) if act == "relu" else torch.randn(m, k, generator=gen)
    b = torch.randn(n, generator=gen)
    q = Q.quantize_weight(w)
    grid = Q.static_params(-2.0, 2.5) if static else None
    if block is None:
        packed = pack_int8_dense(q.codes, q.scales, grid)
    else:
        packed = pack_int8_bsr(q.codes, q.scales, block, mask, grid)
    spec = KernelSpec(
        Conv2dGeometry.dense(m, k),
        n,
        packed.block,
        packed.nnzb,
        activation=act,  # type: ignore[arg-type]
        number_format="int8",
        static_activations=static,
        weight_layout=packed.layout,  # type: ignore[arg-type]
    )
    kernel = compat.build(narrow_kernel(spec), TARGET)["main"]
    y = torch.empty(m, n)
    kernel(x, *packed.arrays, b, y)
    xq = Q.fake_quant_tensor_ref(x, *grid) if grid else Q.fake_quant_rows_ref(x)
    reference = _activate(F.linear(xq.double(), q.dequantized().double(), b.double()), act)
    sx = torch.full((m,), grid[0]) if grid else Q.quantize_rows(x)[1]
    step = sx.double()[:, None] * q.scales.double()[None, :]
    return y, reference, step


@needs_vnni
@pytest.mark.parametrize(
    ("block", "m", "act"),
    [
        (None, 100, None),  # dense, ragged M
        (None, 37, "gelu"),
        ((16, 4), 100, "relu"),
        ((16, 4), 128, None),
        ((1, 4), 100, "gelu"),
        ((4, 4), 128, None),
        ((4, 4), 37, "relu"),
        ((2, 4), 64, None),
        ((8, 4), 100, None),
    ],
    ids=str,
)
def test_int8_kernels_within_a_fraction_of_a_step(block, m, act) -> None:  # type: ignore[no-untyped-def]
    y, reference, step = _int8(m, 128, 96, block, act, static=False)
    slack = 1e-5 if act else 0.0
    steps = ((y.double() - reference).abs() - slack).clamp(min=0) / step
    assert float(steps.max()) < 0.05


@needs_vnni
@pytest.mark.parametrize("block", [None, (16, 4), (4, 4)], ids=str)
def test_int8_static_grid(block) -> None:  # type: ignore[no-untyped-def]
    y, reference, step = _int8(50, 128, 48, block, None, static=True)
    assert float(((y.double() - reference).abs() / step).max()) < 0.05


@needs_vnni
def test_int8_prepass_codes_on_zero_and_huge_rows() -> None:
    """All-zero rows (scale 1) and rows of 1e4 quantize as the reference does, so the outputs stay
    within a fraction of a step (a wrong code would move a row by whole steps)."""
    k, n, m = 64, 32, 20
    x = torch.randn(m, k)
    x[::5] = 0
    x[1::5] *= 1e4
    q = Q.quantize_weight(torch.randn(n, k))
    packed = pack_int8_dense(q.codes, q.scales, None)
    spec = KernelSpec(
        Conv2dGeometry.dense(m, k), n, (16, 4), packed.nnzb, number_format="int8", weight_layout="dense"
    )
    kernel = compat.build(narrow_kernel(spec), TARGET)["main"]
    b, y = torch.zeros(n), torch.empty(m, n)
    kernel(x, *packed.arrays, b, y)
    reference = F.linear(Q.fake_quant_rows_ref(x).double(), q.dequantized().double())
    step = Q.quantize_rows(x)[1].double()[:, None] * q.scales.double()[None, :]
    assert float(((y.double() - reference).abs() / step).max()) < 0.05
    assert bool((y[::5] == 0).all())


@needs_vnni
def test_int8_empty_weight_gives_bias() -> None:
    k, n, m = 64, 32, 20
    mask = torch.zeros(n // 16, k // 4, dtype=torch.bool)
    q = Q.quantize_weight(torch.zeros(n, k))
    packed = pack_int8_bsr(q.codes, q.scales, (16, 4), mask, None)
    spec = KernelSpec(Conv2dGeometry.dense(m, k), n, (16, 4), 0, number_format="int8")
    kernel = compat.build(narrow_kernel(spec), TARGET)["main"]
    x, b, y = torch.randn(m, k), torch.randn(n), torch.empty(m, n)
    kernel(x, *packed.arrays, b, y)
    assert torch.equal(y, b.expand(m, n))


@needs_vnni
def test_int8_assembly_uses_vpdpbusd() -> None:
    spec = KernelSpec(Conv2dGeometry.dense(32, 64), 32, (16, 4), 8, number_format="int8")
    asm = str(compat.build(narrow_kernel(spec), TARGET).mod.inspect_source("asm"))
    assert "vpdpbusd" in asm


def _bf16(m: int, k: int, n: int, block: tuple[int, int] | None, act: str | None):  # type: ignore[no-untyped-def]
    w, mask = _weight(n, k, block, seed=3)
    w = Q.round_bf16_ref(w)
    x, b = torch.randn(m, k), torch.randn(n)
    packed = pack_bf16_dense(w) if block is None else pack_bf16_bsr(w, block, mask)
    spec = KernelSpec(
        Conv2dGeometry.dense(m, k),
        n,
        packed.block,
        packed.nnzb,
        activation=act,  # type: ignore[arg-type]
        number_format="bf16",
        weight_layout=packed.layout,  # type: ignore[arg-type]
    )
    kernel = compat.build(narrow_kernel(spec), TARGET)["main"]
    y = torch.empty(m, n)
    kernel(x, *packed.arrays, b, y)
    reference = _activate(F.linear(Q.round_bf16_ref(x).double(), w.double(), b.double()), act)
    return y, reference


@needs_bf16
@pytest.mark.parametrize(
    ("block", "m", "act"),
    [(None, 100, None), (None, 16, "gelu"), ((4, 2), 100, "relu"), ((1, 2), 64, None)],
    ids=str,
)
def test_bf16_kernels_equal_bf16_rounded_reference(block, m, act) -> None:  # type: ignore[no-untyped-def]
    y, reference = _bf16(m, 64, 48, block, act)
    assert float((y.double() - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


_PROBE = """
import numpy as np
import tvm
from tvm.script import tirx as T
from tilefx.lowering import compat
from tilefx.lowering.kernels.bf16_common import cvt_bf16, dot_bf16

@T.prim_func
def probe(X: T.Buffer((32,), "float32"), W: T.Buffer((32,), "float32"), C: T.Buffer((16,), "float32")):
    T.func_attr({"global_symbol": "main", "tirx.noalias": True})
    C[T.ramp(0, 1, 16)] = dot_bf16(
        C[T.ramp(0, 1, 16)],
        cvt_bf16(X[T.ramp(0, 1, 16)], X[T.ramp(16, 1, 16)]),
        cvt_bf16(W[T.ramp(0, 1, 16)], W[T.ramp(16, 1, 16)]),
    )

def bf16(a):  # round to nearest even on the bits, as torch's .bfloat16()
    bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)

built = compat.build(probe, compat.make_target("llvm"))
assert "vdpbf16ps" in str(built.mod.inspect_source("asm"))
rng = np.random.default_rng(0)
x, w = rng.standard_normal(32).astype(np.float32), rng.standard_normal(32).astype(np.float32)
c = tvm.runtime.tensor(np.zeros(16, np.float32))
built["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), c)
expected = (bf16(x).astype(np.float64) * bf16(w)).reshape(16, 2).sum(1)
assert float(np.abs(c.numpy() - expected).max()) < 1e-5, (c.numpy(), expected)
print("probe ok")
"""


@needs_bf16
def test_bf16_codegen_probe(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The bf16 kernels rely on TVM passing an intrinsic's ``<32 x bfloat>`` result straight to
    ``vdpbf16ps`` (``kernels.bf16_common``); built in a subprocess, because when a TVM upgrade
    breaks that, the build may crash the process rather than raise."""
    script = tmp_path / "bf16_probe.py"  # TVMScript parses its functions' source: a file, not -c
    script.write_text(_PROBE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "probe ok" in done.stdout, (
        f"the bf16 codegen trick no longer builds or computes (exit {done.returncode}): {done.stderr[-2000:]}"
    )
