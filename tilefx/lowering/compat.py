"""The one place where TVM version differences live.

tilefx pins apache-tvm 0.27, where targets are dicts, ``tvm.compile`` builds, Relay is gone and
``tvm.tir`` is split into ``tvm.tirx``/``tvm.s_tir``. Everything else in ``lowering/`` calls these
helpers instead of TVM's build/target API directly, so the next TVM release changes one file.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import tvm
import tvm_ffi
from tvm.target import codegen

from tilefx.errors import LoweringError
from tilefx.runtime.artifact import reported_number_formats

__all__ = [
    "KNOWN_TARGETS",
    "build",
    "cpu_features",
    "cuda_ptx",
    "cuda_source",
    "host_mcpu",
    "host_num_cores",
    "is_cuda",
    "make_target",
    "nvcc_available",
    "to_tvm",
    "vector_lanes",
]

log = logging.getLogger(__name__)

#: Target kinds lowering has kernels for; anything else is rejected before any compile.
KNOWN_TARGETS = ("llvm", "cuda")


@functools.lru_cache(maxsize=1)
def host_mcpu() -> str:
    """LLVM's name for this CPU (e.g. ``znver3``): enables AVX2/AVX-512 code generation."""
    return str(codegen.llvm_get_system_cpu())


@functools.lru_cache(maxsize=1)
def host_mattr() -> tuple[str, ...]:
    """``+feature`` for each number-format instruction set this CPU reports but LLVM's model of
    ``host_mcpu()`` lacks. Virtual machines often hide the CPU model, and LLVM then names an older
    one (a Sapphire Rapids guest reads as ``rocketlake``: no AVX512-BF16, no AMX), although the
    instructions run."""
    modelled = cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu()}))
    return tuple(f"+{name}" for name in sorted(reported_number_formats() - modelled))


def host_num_cores() -> int:
    """Threads TVM's pool will use: ``TVM_NUM_THREADS`` if set, else the cores we may run on."""
    env = os.environ.get("TVM_NUM_THREADS")
    if env and env.isdigit():
        return int(env)
    return len(os.sched_getaffinity(0))


def make_target(target: str | dict[str, Any] | tvm.target.Target) -> tvm.target.Target:
    """A TVM target from ``"llvm"``, ``"cuda"``, a target dict or a Target.

    Plain ``"llvm"`` gets the host's mcpu so LLVM may use its vector units (without it LLVM
    targets a generic x86-64 and emits SSE2 only), plus the number-format features the CPU has
    beyond LLVM's model of it (:func:`host_mattr`). ``"cuda"`` without an arch gets ``sm_80``,
    which builds on machines without a GPU.
    """
    if isinstance(target, tvm.target.Target):
        return target
    spec: dict[str, Any] = {"kind": target} if isinstance(target, str) else dict(target)
    kind = spec.get("kind")
    if kind not in KNOWN_TARGETS:
        raise LoweringError(f"unknown target {target!r}: tilefx has kernels for {', '.join(KNOWN_TARGETS)}")
    if kind == "llvm":
        if "mcpu" not in spec:
            spec["mcpu"] = host_mcpu()
            if host_mattr() and "mattr" not in spec:
                spec["mattr"] = list(host_mattr())
        spec.setdefault("num-cores", host_num_cores())
    if kind == "cuda":
        spec.setdefault("arch", "sm_80")
    try:
        return tvm.target.Target(spec)
    except Exception as exc:  # TVM raises its own error types; ours must be typed
        raise LoweringError(f"invalid target {target!r}: {exc}") from exc


def is_cuda(target: tvm.target.Target) -> bool:
    return str(target.kind.name) == "cuda"


def vector_lanes(target: tvm.target.Target, dtype_bits: int = 32) -> int:
    """fp32 lanes of the widest vector register the target has (AVX-512: 16, AVX2: 8, else 4)."""
    features = cpu_features(target)
    width = 512 if "avx512f" in features else 256 if "avx2" in features or "avx" in features else 128
    return width // dtype_bits


def cpu_features(target: tvm.target.Target) -> frozenset[str]:
    """LLVM's feature names for a CPU target (``avx512vnni``, ``avx512bf16``, ``amx-int8``, ...)."""
    return frozenset(str(f) for f in codegen.llvm_get_cpu_features(target))


def build(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> Any:
    """Compile one PrimFunc for ``target``; ``build(...)["main"]`` is the callable kernel."""
    return tvm.compile(tvm.IRModule({"main": func}), target=target)


def nvcc_available() -> bool:
    """True when a CUDA toolkit (nvcc) is installed: needed for PTX, not for CUDA source."""
    import shutil

    return shutil.which("nvcc") is not None


def cuda_source(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> str:
    """CUDA C source of a scheduled PrimFunc.

    ``tvm.compile`` for CUDA generates the device source eagerly and defers nvcc/NVRTC to load
    time, so this works on a machine without a GPU or a CUDA toolkit.
    """
    executable = build(func, target)
    return str(executable.mod.imports[0].inspect_source("cuda"))


def cuda_ptx(source: str, target: tvm.target.Target) -> bytes:
    """PTX for CUDA source via nvcc (requires ``nvcc_available()``; no GPU needed)."""
    from tvm.support import nvcc

    suffix = str(target.attrs["arch"]).removeprefix("sm_")
    gencode = ["-gencode", f"arch=compute_{suffix},code=sm_{suffix}"]
    with target:  # nvcc's helpers read the arch from the current target
        return bytes(nvcc.compile_cuda(source, target_format="ptx", arch=gencode, compiler="nvcc"))


def to_tvm(tensor: Any) -> tvm.runtime.Tensor:
    """Zero-copy view of a DLPack-capable tensor (torch, numpy) as a TVM tensor."""
    return tvm_ffi.from_dlpack(tensor)
