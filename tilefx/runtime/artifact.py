"""Load and run an exported artifact (``tilefx.export``) with numpy arrays: no torch, no passes.

An artifact is a directory: ``model.so`` (the whole model as a Relax VM executable, weights
embedded) and ``manifest.json`` (inputs and outputs, the TVM version and target it was built
for, the CPU features its code uses, the recipe, and a sha256 of every other file). ``load``
checks all of that before it opens the library, because a library built for another TVM or
CPU, or a truncated one, crashes the process (an illegal instruction, a segfault) rather than
raising. Every failure is an ``ArtifactError``; a call with the wrong inputs is an
``ArtifactInputError`` naming the input.

Imports numpy and TVM's runtime only; the manifest format is shared with the exporter through
the constants here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tilefx.errors import ArtifactError, ArtifactInputError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LIBRARY",
    "MANIFEST",
    "Artifact",
    "TensorSpec",
    "file_digest",
    "host_cpu_features",
    "isa_features",
    "load",
]

log = logging.getLogger(__name__)

FORMAT = "tilefx-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one input or output, as the manifest records it."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @staticmethod
    def from_json(data: Any, where: str) -> TensorSpec:
        try:
            return TensorSpec(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"manifest: malformed {where} entry {data!r}") from exc

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: LLVM feature names that are instruction-set extensions (code using them needs them). The
#: rest of LLVM's list are tuning hints (``fast-lzcnt``, ``macrofusion``) any CPU can ignore.
_ISA_PREFIXES = (
    "adx", "aes", "amx", "avx", "bmi", "cx16", "f16c", "fma", "gfni", "lzcnt", "movbe",
    "pclmul", "popcnt", "sha", "sse", "ssse3", "vaes", "vpclmulqdq", "xop", "neon", "sve",
)  # fmt: skip


def isa_features(features: Any) -> frozenset[str]:
    """The instruction-set extensions among LLVM feature names (see ``_ISA_PREFIXES``)."""
    return frozenset(str(f) for f in features if str(f).startswith(_ISA_PREFIXES))


#: Linux cpuinfo flags of the number-format instructions tilefx's kernels use -> LLVM's names.
_NUMBER_FORMAT_FLAGS = {
    "avx512_vnni": "avx512vnni",
    "avx512_bf16": "avx512bf16",
    "amx_tile": "amx-tile",
    "amx_int8": "amx-int8",
    "amx_bf16": "amx-bf16",
}


def reported_number_formats() -> frozenset[str]:
    """LLVM's names of the number-format instruction sets the kernel reports in /proc/cpuinfo
    (empty elsewhere): LLVM's model of a virtual machine's CPU may lack some that run."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return frozenset()
    return frozenset(llvm for flag, llvm in _NUMBER_FORMAT_FLAGS.items() if flag in flags)


def host_cpu_features() -> frozenset[str]:
    """The instruction-set extensions (``avx2``, ``avx512f``, ...) of this machine's CPU."""
    from tvm.target import Target, codegen  # TVM is loaded when an artifact is, not before

    host = Target({"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu())})
    return isa_features(codegen.llvm_get_cpu_features(host)) | reported_number_formats()


class Artifact:
    """A loaded artifact: call it with numpy arrays (positionally, in the manifest's order).

    Returns one array for a model with one output, else a tuple. Inputs are checked against the
    manifest first; the Relax VM would otherwise fail with TVM's own error, or not at all.
    """

    def __init__(self, path: Path, manifest: Mapping[str, Any], run: Callable[..., Any]) -> None:
        self.path = path
        self.manifest = dict(manifest)
        self.inputs = tuple(TensorSpec.from_json(d, "input") for d in manifest["inputs"])
        self.outputs = tuple(TensorSpec.from_json(d, "output") for d in manifest["outputs"])
        self._single = bool(manifest.get("single_output", len(self.outputs) == 1))
        self._run = run

    def __call__(self, *arrays: Any) -> Any:
        import tvm

        if len(arrays) != len(self.inputs):
            names = ", ".join(spec.name for spec in self.inputs)
            raise ArtifactInputError(f"artifact takes {len(self.inputs)} inputs ({names}), got {len(arrays)}")
        tensors = [
            tvm.runtime.tensor(self._checked(a, spec)) for a, spec in zip(arrays, self.inputs, strict=True)
        ]
        result = self._run(*tensors)
        outputs = tuple(np.asarray(o.numpy()) for o in _flatten(result))
        return outputs[0] if self._single else outputs

    @staticmethod
    def _checked(array: Any, spec: TensorSpec) -> np.ndarray:
        value = np.asarray(array)
        if str(value.dtype) != spec.dtype:
            raise ArtifactInputError(
                f"input {spec.name!r}: dtype {value.dtype}, the artifact takes {spec.dtype}"
            )
        if tuple(value.shape) != spec.shape:
            raise ArtifactInputError(
                f"input {spec.name!r}: shape {tuple(value.shape)}, the artifact was built for {spec.shape}"
            )
        return np.ascontiguousarray(value)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{s.name}{list(s.shape)}" for s in self.inputs)
        return f"Artifact({str(self.path)!r}, inputs=[{shapes}], target={self.manifest.get('target')!r})"


def load(path: str | Path) -> Artifact:
    """The artifact in directory ``path``, checked, loaded and ready to call.

    Raises ``ArtifactError`` for a missing or malformed manifest, a file whose sha256 differs
    from the manifest's (corrupted, truncated, replaced), a TVM version other than the one it
    was built with, or a target this machine cannot run (another architecture, a CPU feature
    the host lacks); and when TVM still cannot load the library.
    """
    directory = Path(path)
    manifest = _read_manifest(directory)
    _check_files(directory, manifest)
    _check_tvm(manifest)
    _check_host(manifest)
    return Artifact(directory, manifest, _open(directory / str(manifest["library"])))


def _read_manifest(directory: Path) -> dict[str, Any]:
    file = directory / MANIFEST
    if not file.is_file():
        raise ArtifactError(
            f"{directory}: no {MANIFEST}; not a tilefx artifact (write one with tilefx.export)"
        )
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{file}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{file}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{file}: format version {manifest.get('format_version')!r}, this tilefx reads {FORMAT_VERSION}"
        )
    for key in ("library", "files", "inputs", "outputs", "tvm_version", "target", "arch", "cpu_features"):
        if key not in manifest:
            raise ArtifactError(f"{file}: manifest has no {key!r}")
    if not isinstance(manifest["files"], dict) or manifest["library"] not in manifest["files"]:
        raise ArtifactError(f"{file}: manifest's 'files' must list the library {manifest['library']!r}")
    return manifest


def _check_files(directory: Path, manifest: Mapping[str, Any]) -> None:
    for name, expected in manifest["files"].items():
        file = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"manifest lists {name!r}, outside the artifact directory")
        if not file.is_file():
            raise ArtifactError(f"{file}: missing (the manifest lists it)")
        if file_digest(file) != expected:
            raise ArtifactError(
                f"{file}: sha256 differs from the manifest's; the file is corrupted or truncated"
            )


def _check_tvm(manifest: Mapping[str, Any]) -> None:
    import tvm

    if manifest["tvm_version"] != tvm.__version__:
        raise ArtifactError(
            f"artifact built with TVM {manifest['tvm_version']}, this is TVM {tvm.__version__}; "
            "export it again with this TVM"
        )


def _check_host(manifest: Mapping[str, Any]) -> None:
    if manifest["arch"] != platform.machine():
        raise ArtifactError(f"artifact built for {manifest['arch']}, this machine is {platform.machine()}")
    host = host_cpu_features()
    for number_format, feature in dict(manifest.get("required_features") or {}).items():
        if feature not in host:
            raise ArtifactError(
                f"artifact's {number_format} kernels need the CPU feature {feature!r}, which this host "
                f"lacks; export it again without quantization (or with another format) for this machine"
            )
    missing = sorted(set(manifest["cpu_features"]) - host)
    if missing:
        raise ArtifactError(
            f"artifact built for target {manifest['target']!r} uses CPU features this host lacks: "
            f"{', '.join(missing)}; export it again on (or for) this machine"
        )


def _open(library: Path) -> Callable[..., Any]:
    import tvm
    from tvm import relax

    try:
        executable = tvm.runtime.load_module(str(library))
        return relax.VirtualMachine(executable, tvm.cpu())["main"]
    except Exception as exc:  # TVM raises its own error types
        raise ArtifactError(f"{library}: TVM cannot load it ({exc})") from exc


def _flatten(result: Any) -> Sequence[Any]:
    if hasattr(result, "numpy"):
        return [result]
    flat: list[Any] = []
    for item in result:
        flat.extend(_flatten(item))
    return flat
