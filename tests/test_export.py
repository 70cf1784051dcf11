"""``tilefx.export`` and ``tilefx.runtime.load``: a round trip without torch, and every bad artifact typed.

One small conv + linear model, block-pruned, is exported once per module; each corruption test
works on its own copy of that artifact.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import tilefx
import tilefx.runtime
from tilefx.export_artifact import relative_error
from tilefx.runtime.artifact import host_cpu_features

ROOT = Path(__file__).resolve().parents[1]

#: Makes ``import torch`` fail in a subprocess, as on a machine where torch is not installed.
NO_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None
sys.meta_path.insert(0, _NoTorch())
"""


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x)).flatten(1)
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


RECIPE = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(4, 1), sparsity=0.5))


@pytest.fixture(scope="module")
def example() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


@pytest.fixture(scope="module")
def optimized(example: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return tilefx.optimize(ConvNet().eval(), example, recipe=RECIPE)


@pytest.fixture(scope="module")
def exported(
    optimized: torch.fx.GraphModule,
    example: tuple[torch.Tensor, ...],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    return tilefx.export(optimized, example, tmp_path_factory.mktemp("artifact") / "convnet", recipe=RECIPE)


@pytest.fixture
def artifact(exported: Path, tmp_path: Path) -> Path:
    """A private copy of the exported artifact, free to corrupt."""
    return Path(shutil.copytree(exported, tmp_path / "copy"))


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path: Path, manifest: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip_in_a_fresh_process_without_torch(
    exported: Path, optimized: torch.fx.GraphModule, example: tuple[torch.Tensor, ...], tmp_path: Path
) -> None:
    np.save(tmp_path / "x.npy", example[0].numpy())
    code = (
        NO_TORCH
        + f"""
import numpy as np
import tilefx.runtime
model = tilefx.runtime.load({str(exported)!r})
np.save({str(tmp_path / "y.npy")!r}, model(np.load({str(tmp_path / "x.npy")!r})))
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "torch" or m.startswith("tilefx.passes."))
assert loaded == [], loaded
"""
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)
    with torch.no_grad():
        expected = optimized(*example).numpy()
    assert relative_error(np.load(tmp_path / "y.npy"), expected) <= 1e-5


def test_importing_the_runtime_does_not_import_torch() -> None:
    code = "import sys, tilefx, tilefx.runtime\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_manifest_describes_the_artifact(exported: Path) -> None:
    manifest = _manifest(exported)
    assert manifest["inputs"] == [{"name": "x", "shape": [2, 3, 8, 8], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "output_0", "shape": [2, 12], "dtype": "float32"}]
    assert manifest["tilefx_version"] == tilefx.__version__
    assert manifest["recipe"]["blocks"]["block"] == [4, 1]
    assert set(manifest["files"]) == {"model.so"} and len(manifest["files"]["model.so"]) == 64
    layers = {layer["weight"]: layer for layer in manifest["layers"]}
    assert set(layers) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    assert layers["fc1.weight"]["activation"] == "gelu" and layers["conv1.weight"]["activation"] == "relu"


def test_calls_are_checked_against_the_manifest(exported: Path, example: tuple[torch.Tensor, ...]) -> None:
    model = tilefx.runtime.load(exported)
    x = example[0].numpy()
    with pytest.raises(tilefx.ArtifactInputError, match="input 'x': shape"):
        model(x[:1])
    with pytest.raises(tilefx.ArtifactInputError, match="input 'x': dtype float64"):
        model(x.astype(np.float64))
    with pytest.raises(tilefx.ArtifactInputError, match=r"takes 1 inputs \(x\), got 2"):
        model(x, x)


def _flip_a_byte(path: Path) -> None:
    library = path / "model.so"
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    library = path / "model.so"
    library.write_bytes(library.read_bytes()[:1000])


def _remove_manifest(path: Path) -> None:
    (path / "manifest.json").unlink()


def _garble_manifest(path: Path) -> None:
    (path / "manifest.json").write_text('{"format": "tilefx-artifact", ')


def _other_tvm(path: Path) -> None:
    _write_manifest(path, {**_manifest(path), "tvm_version": "0.26.0"})


def _other_arch(path: Path) -> None:
    manifest = _manifest(path)
    _write_manifest(path, {**manifest, "arch": "aarch64" if manifest["arch"] != "aarch64" else "x86_64"})


def _feature_the_host_lacks(path: Path) -> None:
    host = host_cpu_features()
    lacking = next(
        f for f in ("amx-tile", "avx512fp16", "avx10.1-512", "sve2", "avx-fictional") if f not in host
    )
    manifest = _manifest(path)
    _write_manifest(path, {**manifest, "cpu_features": [*manifest["cpu_features"], lacking]})


def _garbage_library_with_matching_checksum(path: Path) -> None:
    from tilefx.runtime.artifact import file_digest

    (path / "model.so").write_bytes(b"\x7fELF not really a library")
    manifest = _manifest(path)
    _write_manifest(path, {**manifest, "files": {"model.so": file_digest(path / "model.so")}})


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_flip_a_byte, "sha256 differs"),
        (_truncate, "sha256 differs"),
        (_remove_manifest, "no manifest.json"),
        (_garble_manifest, "unreadable manifest"),
        (_other_tvm, "built with TVM 0.26.0"),
        (_other_arch, "built for"),
        (_feature_the_host_lacks, "CPU features this host lacks"),
        (_garbage_library_with_matching_checksum, "TVM cannot load it"),
    ],
)
def test_a_bad_artifact_is_a_typed_error_at_load(artifact: Path, corrupt, message: str) -> None:  # type: ignore[no-untyped-def]
    corrupt(artifact)
    with pytest.raises(tilefx.ArtifactError, match=message):
        tilefx.runtime.load(artifact)


def test_a_bad_artifact_fails_the_same_without_torch(artifact: Path) -> None:
    _flip_a_byte(artifact)
    code = (
        NO_TORCH
        + f"""
import tilefx.runtime
from tilefx.errors import ArtifactError, OptimizeError
try:
    tilefx.runtime.load({str(artifact)!r})
except ArtifactError as exc:
    assert isinstance(exc, OptimizeError)
    print("typed:", exc)
"""
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "typed:" in done.stdout and "sha256" in done.stdout


class Frac(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.frac(self.fc(x))


def test_an_op_tvm_cannot_import_is_named(tmp_path: Path) -> None:
    x = torch.randn(2, 8)
    gm = tilefx.capture(Frac().eval(), (x,))
    with pytest.raises(tilefx.UnsupportedOpError, match=r"node 'frac'.*aten\.frac") as raised:
        tilefx.export(gm, (x,), tmp_path / "frac")
    assert raised.value.node == "frac"
    assert not (tmp_path / "frac").exists()


def test_a_compiled_graph_is_refused_naming_its_kernel_node(
    optimized: torch.fx.GraphModule, example: tuple[torch.Tensor, ...], tmp_path: Path
) -> None:
    compiled = tilefx.compile(optimized, fallback="never")
    with pytest.raises(tilefx.LoweringError, match=r"node 'bsr_.*calls a compiled kernel module"):
        tilefx.export(compiled, example, tmp_path / "compiled")


def test_a_module_is_refused(example: tuple[torch.Tensor, ...], tmp_path: Path) -> None:
    with pytest.raises(tilefx.LoweringError, match="takes the GraphModule tilefx.optimize returns"):
        tilefx.export(ConvNet(), example, tmp_path / "module")  # type: ignore[arg-type]


def test_an_unpruned_graph_runs_every_layer_at_full_density(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 6)).eval()
    x = torch.randn(5, 12)
    gm = tilefx.capture(model, (x,))
    path = tilefx.export(gm, (x,), tmp_path / "dense")
    layers = _manifest(path)["layers"]
    assert [layer["pruned"] for layer in layers] == [False, False]
    assert all(layer["stored_blocks"] == layer["total_blocks"] for layer in layers)
    with torch.no_grad():
        assert relative_error(tilefx.runtime.load(path)(x.numpy()), model(x).numpy()) <= 1e-5


def test_a_small_bert_round_trips(tmp_path: Path) -> None:
    """Embeddings, a boolean attention mask through SDPA, GELU, layer norms: MiniLM's ops, tiny."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 10:] = 0
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(16, 1), sparsity=0.5))
    gm = tilefx.optimize(model, (ids, mask), recipe=recipe)
    loaded = tilefx.runtime.load(tilefx.export(gm, (ids, mask), tmp_path / "bert"))
    with torch.no_grad():
        expected = [t.numpy() for t in torch.utils._pytree.tree_leaves(gm(ids, mask))]
    got = loaded(ids.numpy(), mask.numpy())
    assert len(got) == len(expected)
    for actual, reference in zip(got, expected, strict=True):
        assert relative_error(actual, reference) <= 1e-5
    assert any(layer["pruned"] for layer in loaded.manifest["layers"])
