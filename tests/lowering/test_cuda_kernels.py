"""CUDA: source generation runs everywhere (CI has no GPU); PTX needs nvcc; running needs a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tilefx.lowering import compat
from tilefx.lowering.kernels.spec import Conv2dGeometry, KernelSpec
from tilefx.lowering.schedules.cuda import cuda_kernel
from tilefx.runtime.packing import pack_bsr

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_target():  # type: ignore[no-untyped-def]
    return compat.make_target("cuda")


@pytest.fixture(scope="module")
def source(cuda_target):  # type: ignore[no-untyped-def]
    spec = KernelSpec(Conv2dGeometry.dense(64, 96), 128, (16, 4), 40, activation="relu")
    return compat.cuda_source(cuda_kernel(spec), cuda_target)


def test_cuda_source_builds_without_a_gpu(source):  # type: ignore[no-untyped-def]
    assert "__global__" in source
    assert "__shared__" in source  # X tiles are staged in shared memory
    assert "__syncthreads()" in source
    assert "blockIdx.x" in source and "threadIdx.x" in source


def test_cuda_source_with_the_gelu_epilogue_builds(cuda_target):  # type: ignore[no-untyped-def]
    spec = KernelSpec(Conv2dGeometry.dense(64, 96), 128, (16, 4), 40, activation="gelu")
    source = compat.cuda_source(cuda_kernel(spec), cuda_target)
    assert "__global__" in source and "erf" not in source  # the rational erf, no libm call


@pytest.mark.skipif(not compat.nvcc_available(), reason="nvcc (CUDA toolkit) not installed")
def test_cuda_source_compiles_to_ptx(source, cuda_target):  # type: ignore[no-untyped-def]
    ptx = compat.cuda_ptx(source, cuda_target)
    assert b".entry main_kernel" in ptx


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("block", [(1, 1), (16, 1), (4, 4), (32, 32)], ids=str)
@pytest.mark.parametrize("m", [1, 128])
def test_cuda_kernel_matches_masked_reference(block, m, make_block_sparse, cuda_target):  # type: ignore[no-untyped-def]
    n, k = 64, 128
    weight, mask = make_block_sparse(n, k, block)
    packed = pack_bsr(weight, block, mask)
    spec = KernelSpec(Conv2dGeometry.dense(m, k), n, block, packed.nnzb, activation="relu")
    kernel = compat.build(cuda_kernel(spec), cuda_target)["main"]
    dev = torch.device("cuda")
    x, bias = torch.randn(m, k, device=dev), torch.randn(n, device=dev)
    y = torch.empty(m, n, device=dev)
    kernel(x, packed.data.to(dev), packed.indices.to(dev), packed.indptr.to(dev), bias, y)
    torch.testing.assert_close(y, torch.relu(F.linear(x, weight.to(dev), bias)), rtol=1e-4, atol=1e-4)


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 1)
        self.fc = torch.nn.Linear(8, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.conv(x).mean((2, 3))))


def _pruned_mlp(device: str) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    from tilefx.passes.metadata import BlockSparsity, Metadata, apply_masks, set_metadata

    x = torch.randn(2, 4, 5, 5, device=device)
    gm = torch.export.export(_Mlp().to(device), (x,)).module()
    metadata = Metadata()
    for name, block in (("conv.weight", (2, 2)), ("fc.weight", (8, 1))):
        w = gm.get_parameter(name)
        mask = torch.rand(w.shape[0] // block[0], w[0].numel() // block[1]) < 0.5
        metadata = metadata.with_annotation(name, BlockSparsity(block, mask))
    set_metadata(gm, metadata)
    apply_masks(gm, gm)
    return gm, x


def test_compile_graph_for_cuda_builds_without_a_gpu() -> None:
    from tilefx.lowering.build import compile_graph
    from tilefx.runtime.sparse_modules import BsrLinear

    gm, _ = _pruned_mlp("cpu")
    out = compile_graph(gm, "cuda")
    assert [type(m) for m in out.children()].count(BsrLinear) == 1
    assert "aten.conv2d" in out.code  # no CUDA conv kernel yet: it stays torch


@pytest.mark.cuda
@needs_gpu
def test_compile_graph_runs_on_cuda() -> None:
    from tilefx.lowering.build import compile_graph

    gm, x = _pruned_mlp("cuda")
    out = compile_graph(gm, "cuda")
    torch.testing.assert_close(out(x), gm(x), rtol=1e-4, atol=1e-4)
