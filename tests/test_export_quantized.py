"""``tilefx.export`` of a quantized model: int8/bf16 kernels in the artifact, run without torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilefx
import tilefx.runtime
from tests.test_export import NO_TORCH, ROOT
from tilefx.export_artifact import relative_error
from tilefx.lowering import compat
from tilefx.runtime import artifact

pytestmark = pytest.mark.filterwarnings("ignore::tilefx.CoverageWarning")  # head.weight: 20 rows
FEATURES = compat.cpu_features(compat.make_target("llvm"))
needs_vnni = pytest.mark.skipif("avx512vnni" not in FEATURES, reason="CPU has no AVX512-VNNI")
X = torch.randn(24, 128, generator=torch.Generator().manual_seed(0))


class MLP(nn.Module):
    """Two layers the int8 kernels take, and one (20 outputs) left to the fake-quant simulation."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 64)
        self.head = nn.Linear(64, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.down(F.gelu(self.up(x)))))


@pytest.fixture(scope="module")
def optimized() -> torch.fx.GraphModule:
    recipe = tilefx.Recipe(
        blocks=tilefx.BlockPruning(block=(16, 4), sparsity=0.7, reorder="none"),
        quantize=tilefx.Quantization(),
    )
    return tilefx.optimize(MLP().eval(), (X,), recipe)


@pytest.fixture(scope="module")
def exported(optimized: torch.fx.GraphModule, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tilefx.export(optimized, (X,), tmp_path_factory.mktemp("int8") / "art")


@needs_vnni
def test_int8_artifact_round_trips_without_torch(
    exported: Path, optimized: torch.fx.GraphModule, tmp_path: Path
) -> None:
    np.save(tmp_path / "x.npy", X.numpy())
    code = (
        NO_TORCH
        + f"""
import numpy as np
import tilefx.runtime
model = tilefx.runtime.load({str(exported)!r})
np.save({str(tmp_path / "y.npy")!r}, model(np.load({str(tmp_path / "x.npy")!r})))
assert not [m for m in sys.modules if m.split(".")[0] == "torch"]
"""
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)
    with torch.no_grad():
        expected = optimized(X).numpy()
    assert relative_error(np.load(tmp_path / "y.npy"), expected) <= 1e-4


@needs_vnni
def test_manifest_names_the_int8_kernels_and_their_cpu_feature(exported: Path) -> None:
    manifest = tilefx.runtime.load(exported).manifest
    formats = [(layer["weight"], layer["number_format"], layer["pruned"]) for layer in manifest["layers"]]
    assert formats == [
        ("up.weight", "int8", True),
        ("down.weight", "int8", True),
        ("head.weight", "fp32", False),
    ]
    assert manifest["required_features"] == {"int8": "avx512vnni"}


@needs_vnni
def test_a_host_without_vnni_refuses_the_artifact(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifact, "host_cpu_features", lambda: frozenset({"avx2", "avx512f"}))
    with pytest.raises(tilefx.ArtifactError, match="int8 kernels need the CPU feature 'avx512vnni'"):
        tilefx.runtime.load(exported)


@pytest.mark.skipif("avx512bf16" not in FEATURES, reason="CPU has no AVX512-BF16")
def test_bf16_artifact_equals_the_graph(tmp_path: Path) -> None:
    gm = tilefx.optimize(MLP().eval(), (X,), tilefx.Recipe(quantize=tilefx.Quantization(format="bf16")))
    loaded = tilefx.runtime.load(tilefx.export(gm, (X,), tmp_path / "art"))
    with torch.no_grad():
        expected = gm(X).numpy()
    assert relative_error(loaded(X.numpy()), expected) <= 1e-4
    assert [layer["number_format"] for layer in loaded.manifest["layers"]] == ["bf16", "bf16", "fp32"]


@needs_vnni
def test_a_wrong_kernel_argument_fails_the_export_check(
    optimized: torch.fx.GraphModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The looser check for quantized artifacts still catches a kernel given wrong scales."""
    from tilefx.lowering import relax_export

    pack = relax_export.pack_narrow

    def wrong_scales(*args, **kwargs):  # type: ignore[no-untyped-def]
        packed = pack(*args, **kwargs)
        arrays = list(packed.arrays)
        arrays[3] = arrays[3] * 1.1  # sw: the per-channel weight scales
        return dataclasses.replace(packed, arrays=tuple(arrays))

    monkeypatch.setattr(relax_export, "pack_narrow", wrong_scales)
    with pytest.raises(tilefx.VerificationError, match="relative Frobenius error"):
        tilefx.export(optimized, (X,), tmp_path / "art")
