"""Every CPU kernel equals the dense masked reference, for all block shapes and the ragged edges.

Kernels are compiled once per (block, batch, template) in module-scoped fixtures; shapes are
small so the whole file compiles a few dozen kernels (~0.2 s each).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tilefx.lowering import compat
from tilefx.lowering.kernels.bsr_dense import row_lanes_func
from tilefx.lowering.kernels.bsr_token_panels import token_panels_func
from tilefx.lowering.kernels.bsr_tokens import token_lanes_func
from tilefx.lowering.kernels.spec import Conv2dGeometry, KernelSpec
from tilefx.lowering.schedules.cpu import CpuSchedule, choose_cpu_schedule, cpu_kernel, takes_transposed
from tilefx.runtime.packing import pack_bsr

BLOCKS = [(1, 1), (16, 1), (1, 16), (4, 4), (8, 8), (32, 32), (2, 8)]
N, K = 64, 96  # every block above tiles [64, 96]; 32×32 gives two block rows... of three columns
K32 = 128  # (32, 32) needs K divisible by 32


def _k(block: tuple[int, int]) -> int:
    return K32 if block[1] == 32 else K


def _run_dense(spec: KernelSpec, schedule: CpuSchedule | None, weight, mask, x, bias, target):  # type: ignore[no-untyped-def]
    packed = pack_bsr(weight, spec.block, mask)
    kernel = compat.build(cpu_kernel(spec, target, schedule), target)["main"]
    y = torch.empty(x.shape[0], spec.n)
    kernel(x, packed.data, packed.indices, packed.indptr, bias, y)
    return y


def _reference(x, weight, bias, relu):  # type: ignore[no-untyped-def]
    y = F.linear(x, weight, bias)
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("template", ["rows", "panels"])
@pytest.mark.parametrize("m", [1, 128])
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_dense_kernel_matches_masked_reference(block, m, template, make_block_sparse, llvm_target):  # type: ignore[no-untyped-def]
    k = _k(block)
    weight, mask = make_block_sparse(N, k, block, seed=m)
    x, bias = torch.randn(m, k), torch.randn(N)
    relu = template == "rows"  # each template's epilogue is exercised both ways across the grid
    spec = KernelSpec(
        Conv2dGeometry.dense(m, k), N, block, int(mask.sum()), activation="relu" if relu else None
    )
    lanes = compat.vector_lanes(llvm_target)
    chunk = max(d for d in (1, 2, 4, 8, 16) if block[0] % d == 0 and d <= 2 * lanes)
    schedule = CpuSchedule(template, tile=4 if template == "rows" else 16, row_chunk=chunk, parts=1)
    y = _run_dense(spec, schedule, weight, mask, x, bias, llvm_target)
    torch.testing.assert_close(y, _reference(x, weight, bias, relu), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("group", "parts"), [(2, 1), (4, 1), (2, 2), (4, 3)])
@pytest.mark.parametrize("m", [1, 13, 128])
@pytest.mark.parametrize("block", [(8, 8), (16, 1), (32, 32)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_rows_kernel_sweeping_block_row_groups(block, m, group, parts, make_block_sparse, llvm_target):  # type: ignore[no-untyped-def]
    """Task order (part, group, X tile, block row): ragged X tiles, empty and full block rows, batch 1."""
    k = _k(block)
    weight, mask = make_block_sparse(N, k, block, seed=m)
    x, bias = torch.randn(m, k), torch.randn(N)
    spec = KernelSpec(Conv2dGeometry.dense(m, k), N, block, int(mask.sum()))
    group = min(group, N // block[0])  # 32×32 has two block rows
    tile = {1: 1, 13: 5, 128: 6}[m]  # 1, 3 and 22 X tiles, the last two ragged
    parts = parts if -(-m // tile) % parts == 0 else 1
    schedule = CpuSchedule("rows", tile=tile, row_chunk=min(block[0], 16), group=group, parts=parts)
    y = _run_dense(spec, schedule, weight, mask, x, bias, llvm_target)
    torch.testing.assert_close(y, _reference(x, weight, bias, False), rtol=1e-4, atol=1e-4)


def test_rows_group_and_parts_must_divide(llvm_target):  # type: ignore[no-untyped-def]
    spec = KernelSpec(Conv2dGeometry.dense(8, K), N, (16, 1), 4)  # N/16 = 4 block rows, 2 X tiles
    with pytest.raises(ValueError, match="group"):
        cpu_kernel(spec, llvm_target, CpuSchedule("rows", tile=4, row_chunk=16, group=3))
    with pytest.raises(ValueError, match="parts"):
        cpu_kernel(spec, llvm_target, CpuSchedule("rows", tile=4, row_chunk=16, parts=3))


@pytest.mark.parametrize(("parts", "row_parts"), [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize(("m", "k"), [(13, 96), (37, 40), (128, 96)])
@pytest.mark.parametrize("block", [(1, 1), (4, 1), (16, 1), (2, 8)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_panels_split_over_tokens_and_block_rows(
    block, m, k, parts, row_parts, make_block_sparse, llvm_target
):  # type: ignore[no-untyped-def]
    """Threads owning token tiles, block-row ranges or both; ragged tiles; K off the 16 × 16
    register transpose of the pack (40). Y goes through the transpose (groups of 16 columns)."""
    weight, mask = make_block_sparse(N, k, block, seed=m + k)
    x, bias = torch.randn(m, k), torch.randn(N)
    spec = KernelSpec(Conv2dGeometry.dense(m, k), N, block, int(mask.sum()), activation="gelu")
    tiles = -(-m // 16)
    parts = parts if tiles % parts == 0 else 1
    kernel = token_panels_func(spec, 16, min(block[0], 8), parts, row_parts)
    packed = pack_bsr(weight, block, mask)
    y = torch.empty(m, N)
    compat.build(kernel, llvm_target)["main"](x, packed.data, packed.indices, packed.indptr, bias, y)
    torch.testing.assert_close(y, F.gelu(F.linear(x, weight, bias)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("n", "tile", "row_parts"), [(64, 8, 1), (24, 16, 2)])
def test_panels_write_y_without_the_register_transpose(n, tile, row_parts, make_block_sparse, llvm_target):  # type: ignore[no-untyped-def]
    """Tiles of 8 tokens (AVX2), and 3 block rows per part (not a group of 16 columns); K = 40
    keeps the pack off the transpose too, so no shuffle is left anywhere."""
    weight, mask = make_block_sparse(n, 40, (4, 1), seed=n)
    x, bias = torch.randn(37, 40), torch.randn(n)
    spec = KernelSpec(Conv2dGeometry.dense(37, 40), n, (4, 1), int(mask.sum()), activation="relu")
    script = token_panels_func(spec, tile, 4, 1, row_parts)
    assert "T.Shuffle" not in script.script()
    packed = pack_bsr(weight, (4, 1), mask)
    y = torch.empty(37, n)
    compat.build(script, llvm_target)["main"](x, packed.data, packed.indices, packed.indptr, bias, y)
    torch.testing.assert_close(y, torch.relu(F.linear(x, weight, bias)), rtol=1e-4, atol=1e-4)


def test_panels_schedule_splits_threads_over_tiles_first() -> None:
    def schedule(m: int):  # type: ignore[no-untyped-def]
        return choose_cpu_schedule(
            KernelSpec(Conv2dGeometry.dense(m, 384), 1536, (4, 1), 1000), 16, threads=2
        )

    tokens128 = schedule(128)
    assert (tokens128.template, tokens128.tile, tokens128.parts, tokens128.row_parts) == ("panels", 64, 2, 1)
    assert (schedule(168).parts, schedule(168).row_parts) == (1, 2)  # 3 tiles: each thread half the rows
    sixteen = choose_cpu_schedule(KernelSpec(Conv2dGeometry.dense(128, 768), 3072, (16, 1), 9), 16, threads=2)
    assert (sixteen.row_chunk, sixteen.tile) == (8, 32)  # 8 rows × 2 vectors (see schedules.cpu)
    with pytest.raises(ValueError, match="parts 2 must divide the 3 token tiles"):
        token_panels_func(KernelSpec(Conv2dGeometry.dense(168, 384), 1536, (4, 1), 9), 64, 4, 2)


def test_threads_split_x_tiles_when_they_divide() -> None:
    spec = KernelSpec(Conv2dGeometry.dense(128, 768), 3072, (16, 1), 4608)
    assert choose_cpu_schedule(spec, 8, threads=2).parts == 2  # 22 X tiles of 6 rows
    one_row = KernelSpec(Conv2dGeometry.dense(1, 768), 3072, (16, 1), 4608)
    assert choose_cpu_schedule(one_row, 8, threads=2).parts == 1


def test_group_keeps_a_groups_blocks_within_budget() -> None:
    """Dense weights sweep few block rows per X tile, very sparse ones sweep them all."""
    dense = KernelSpec(Conv2dGeometry.dense(128, 3072), 768, (16, 1), 48 * 3072)
    sparse = KernelSpec(Conv2dGeometry.dense(128, 3072), 768, (16, 1), 48 * 3072 // 100)
    few, many = choose_cpu_schedule(dense, 8).group, choose_cpu_schedule(sparse, 8).group
    assert 48 % few == 0 and 48 % many == 0
    assert few * 3072 * 16 * 4 <= 256 * 1024 < 2 * few * 3072 * 16 * 4
    assert many == 48


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_single_nonzero_block(block, make_single_block, llvm_target):  # type: ignore[no-untyped-def]
    k = _k(block)
    weight, mask = make_single_block(N, k, block)
    x, bias = torch.randn(128, k), torch.zeros(N)
    spec = KernelSpec(Conv2dGeometry.dense(128, k), N, block, 1)
    y = _run_dense(spec, None, weight, mask, x, bias, llvm_target)
    torch.testing.assert_close(y, _reference(x, weight, bias, False), rtol=1e-4, atol=1e-4)


def test_all_blocks_dropped_gives_bias(llvm_target):  # type: ignore[no-untyped-def]
    mask = torch.zeros(N // 4, K // 4, dtype=torch.bool)
    x, bias = torch.randn(8, K), torch.randn(N)
    spec = KernelSpec(Conv2dGeometry.dense(8, K), N, (4, 4), 0, activation="relu")
    y = _run_dense(spec, None, torch.zeros(N, K), mask, x, bias, llvm_target)
    torch.testing.assert_close(y, torch.relu(bias).expand(8, N))


CONVS = [
    # (batch, cin, cout, hw, kernel, stride, padding, dilation, block)
    (1, 8, 16, 9, 3, 1, 1, 1, (1, 9)),  # Synaptic Strength: whole 3×3 kernels
    (2, 8, 16, 9, 3, 2, 1, 1, (4, 9)),
    (1, 8, 16, 10, 3, 1, 2, 2, (8, 8)),
    (2, 16, 32, 7, 1, 1, 0, 1, (16, 1)),  # pointwise
    (1, 16, 32, 6, 1, 1, 0, 1, (1, 1)),
    (1, 4, 8, 8, 5, 1, 2, 1, (2, 25)),
    (2, 8, 16, 7, 3, 1, 1, 1, (16, 1)),  # stride 1, batch 2: 63 tokens per image, one tile padded
    (3, 4, 8, 6, 3, 1, 0, 1, (2, 9)),  # no padding: shifted reads run past the last row
]


@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"k{c[4]}s{c[5]}b{c[8][0]}x{c[8][1]}n{c[0]}")
def test_conv_kernel_matches_masked_reference(case, make_block_sparse, llvm_target):  # type: ignore[no-untyped-def]
    batch, cin, cout, hw, kk, stride, padding, dilation, block = case
    weight, mask = make_block_sparse(cout, cin * kk * kk, block)
    geometry = Conv2dGeometry(batch, cin, hw, hw, (kk, kk), (stride,) * 2, (padding,) * 2, (dilation,) * 2)
    spec = KernelSpec(geometry, cout, block, int(mask.sum()), activation="relu")
    packed = pack_bsr(weight, block, mask)
    kernel = compat.build(cpu_kernel(spec, llvm_target), llvm_target)["main"]
    x, bias = torch.randn(batch, cin, hw, hw), torch.randn(cout)
    y = torch.empty(spec.geometry.output_shape(cout))
    kernel(x, packed.data, packed.indices, packed.indptr, bias, y)
    w4 = weight.reshape(cout, cin, kk, kk)
    expected = torch.relu(F.conv2d(x, w4, bias, stride=stride, padding=padding, dilation=dilation))
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_kernel_structure_is_parallel_vectorised_and_register_tiled(llvm_target):  # type: ignore[no-untyped-def]
    spec = KernelSpec(Conv2dGeometry.dense(16, 32), 32, (16, 1), 8)
    script = cpu_kernel(spec, llvm_target).script()
    assert "T.parallel" in script
    assert "T.vectorized" in script
    assert "T.alloc_local" in script  # accumulators live in registers across the ragged loop
    assert "W_indptr[" in script


@pytest.mark.parametrize("block", [(1, 1), (4, 4), (8, 8), (16, 1), (32, 32), (1, 16)])
@pytest.mark.parametrize("lanes", [8, 16])
def test_schedule_keeps_accumulators_in_registers(block, lanes):  # type: ignore[no-untyped-def]
    for geometry in (
        Conv2dGeometry.dense(128, 256),
        Conv2dGeometry.dense(1, 256),
        Conv2dGeometry(1, 32, 8, 8),
    ):
        spec = KernelSpec(geometry, 256 if geometry.is_dense else 64, block, 10)
        s = choose_cpu_schedule(spec, lanes)
        assert block[0] % s.row_chunk == 0
        vectors = (
            s.tile * max(1, s.row_chunk // lanes) if s.template == "rows" else s.row_chunk * (s.tile // lanes)
        )
        assert vectors <= (12 if lanes == 8 else 16)  # of 16 (AVX2) or 32 (AVX-512) registers
        assert (s.template == "tokens") != geometry.is_dense  # convs run `tokens`, linears the others


def test_stride_one_conv_reads_padded_planes_instead_of_an_im2col() -> None:
    """The stride-1 path's X buffer is the padded input (plus a tail), not kh·kw copies of it."""

    def src_floats(stride: int) -> int:
        geometry = Conv2dGeometry(1, 16, 10, 10, (3, 3), (stride, stride), (1, 1))
        script = token_lanes_func(KernelSpec(geometry, 32, (16, 1), 20), 16, 4).script()
        line = next(line for line in script.splitlines() if "src = T.alloc_buffer" in line)
        return int(line.split("((")[1].split(",")[0])

    assert src_floats(1) == 16 * (12 * 12 + 10)  # 16 planes of 12×12, +10 so the last tile stays inside
    assert src_floats(2) == 144 * 32  # im2col: 9 taps × 16 channels, 25 pixels padded to 32


@pytest.mark.parametrize("m", [48, 37])
@pytest.mark.parametrize(
    ("x_t", "y_t"), [(True, False), (False, True), (True, True)], ids=["Xt", "Yt", "XtYt"]
)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_transposed_layouts_match_masked_reference(block, x_t, y_t, m, make_block_sparse, llvm_target):  # type: ignore[no-untyped-def]
    """Reading Xᵀ [K, P] in place and writing Yᵀ [N, P] from the tasks gives the same layer.

    M = 48 is its own pitch; M = 37 has pitch 48, and NaN in X's padding columns shows that
    they reach only the padding columns of Y.
    """
    k = _k(block)
    weight, mask = make_block_sparse(N, k, block, seed=3)
    x, bias = torch.randn(m, k), torch.randn(N)
    spec = KernelSpec(
        Conv2dGeometry.dense(m, k),
        N,
        block,
        int(mask.sum()),
        activation="relu",
        x_transposed=x_t,
        y_transposed=y_t,
    )
    xt = torch.full((k, 48), float("nan"))
    xt[:, :m] = x.T
    packed = pack_bsr(weight, block, mask)
    kernel = compat.build(cpu_kernel(spec, llvm_target), llvm_target)["main"]
    y = torch.full(spec.y_shape, float("nan"))
    kernel(xt if x_t else x, packed.data, packed.indices, packed.indptr, bias, y)
    torch.testing.assert_close(
        y[:, :m].T if y_t else y, _reference(x, weight, bias, True), rtol=1e-4, atol=1e-4
    )


def test_transposed_layouts_need_a_token_tile_dividing_the_pitch_and_a_linear_layer() -> None:
    def spec(m: int, block: tuple[int, int] = (4, 4)) -> KernelSpec:
        return KernelSpec(Conv2dGeometry.dense(m, 64), 64, block, 10, x_transposed=True)

    assert spec(20).x_shape == (64, 32)  # 20 tokens padded to a pitch of 32
    assert takes_transposed(spec(20), 8) and takes_transposed(spec(20), 16)
    assert choose_cpu_schedule(spec(128), 16).tile == 64  # the widest tile within 16 accumulators
    assert choose_cpu_schedule(spec(20), 16).tile == 32  # ... that divides the pitch
    with pytest.raises(ValueError, match="divide the pitch 32"):
        token_panels_func(spec(20), 64, 4, 1)
    assert not takes_transposed(spec(128, (32, 32)), 8)  # `rows` on AVX2: row-major only
    assert takes_transposed(spec(128, (32, 32)), 16)  # on AVX-512 the hand-over beats `rows`
    assert not takes_transposed(spec(8), 16)  # batches under a vector of tokens stay `rows`
    with pytest.raises(ValueError, match="row-major"):
        row_lanes_func(spec(128, (32, 32)), 8, 32)
    with pytest.raises(ValueError, match="linear layers only"):
        KernelSpec(Conv2dGeometry(1, 8, 4, 4), 16, (4, 4), 2, y_transposed=True)


def test_vectorised_erf_is_accurate(llvm_target):  # type: ignore[no-untyped-def]
    """The GELU epilogue's rational erf, compiled, stays within 1e-6 of torch.erf (clamped tails too)."""
    from tvm.script import tirx as T

    from tilefx.lowering.kernels.epilogue import erf

    n = 1 << 16

    @T.prim_func
    def erf_of(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32")) -> None:
        for o in range(n // 16):
            for i in T.vectorized(16):
                b[o * 16 + i] = erf(a[o * 16 + i])

    x = torch.linspace(-8, 8, n)
    y = torch.empty(n)
    compat.build(erf_of, llvm_target)["main"](x, y)
    assert float((y - torch.erf(x)).abs().max()) < 1e-6


@pytest.mark.parametrize("template", ["rows", "panels"])
def test_gelu_epilogue_matches_torch(template, make_block_sparse, llvm_target):  # type: ignore[no-untyped-def]
    weight, mask = make_block_sparse(N, K, (16, 1), seed=5)
    x, bias = 3 * torch.randn(32, K), torch.randn(N)  # outputs well past the erf clamp at ±3.92·√2
    spec = KernelSpec(Conv2dGeometry.dense(32, K), N, (16, 1), int(mask.sum()), activation="gelu")
    schedule = CpuSchedule(
        template, tile=4 if template == "rows" else 16, row_chunk=16 if template == "rows" else 4
    )
    y = _run_dense(spec, schedule, weight, mask, x, bias, llvm_target)
    torch.testing.assert_close(y, F.gelu(F.linear(x, weight, bias)), rtol=1e-4, atol=1e-4)
