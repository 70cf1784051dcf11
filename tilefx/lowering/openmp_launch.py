"""Run the parallel loops of compiled CPU kernels on torch's OpenMP threads instead of TVM's pool.

Two thread pools on the same cores fight: after each op torch's OpenMP (libgomp) workers spin,
and a TVM kernel that follows shares its cores with them. Measured on 2 cores (Intel Xeon,
alternating each kernel with a torch op, medians): BERT FFN1 8×8 at 90% 1.15 ms on TVM's pool,
0.57 ms on torch's threads; ResNet 3×3 16×1 at 90% 0.60 → 0.31 ms; a MiniLM-sized linear
0.16 → 0.10 ms. Telling libgomp not to spin (``OMP_WAIT_POLICY=PASSIVE``) helps the kernels but
makes torch's own small ops 10–15% slower, and it only works if set before torch loads.

A compiled TVM library calls its parallel loops through one function pointer,
``__TVMBackendParallelLaunch``, which the runtime fills in when it loads the library. We load
the kernel from a shared library, open the same library with ``ctypes`` (the same handle, so the
same global) and point it at a ten-line OpenMP launcher compiled here against libgomp's soname:
loaded after torch, it binds to torch's libgomp and so runs each loop on torch's own team.
This needs Linux, torch built with libgomp and a C compiler; otherwise kernels keep TVM's pool
(``TILEFX_OPENMP_LAUNCH=0`` forces that), ``available()`` says why not, and
``keep_tvm_pool_asleep`` stops that pool spinning before the first kernel runs on it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import compat, native_cache

__all__ = [
    "available",
    "cache_dir",
    "contention_warning",
    "keep_tvm_pool_asleep",
    "launcher_address",
    "share_torch_threads",
]

log = logging.getLogger(__name__)

#: TVM's thread pool reads it once, when it starts: iterations a worker spins before it sleeps.
_SPIN_COUNT = "TVM_THREAD_POOL_SPIN_COUNT"

#: TVM's C ABI for a parallel loop body (``c_runtime_api.h``): the launcher calls it once per
#: thread with that thread's index and the team size; the body splits the loop itself.
_SOURCE = r"""
#include <omp.h>
#include <stdint.h>
typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
int tilefx_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int failed = 0;
  #pragma omp parallel num_threads(num_task > 0 ? num_task : omp_get_max_threads())
  {
    TVMParallelGroupEnv env = {0, omp_get_num_threads()};
    if (flambda(omp_get_thread_num(), &env, cdata) != 0) {
      #pragma omp atomic write
      failed = 1;
    }
  }
  return failed ? -1 : 0;
}
"""


def _torch_libgomp() -> str | None:
    """Path of the loaded ``libgomp.so.1``, the soname torch links and our launcher will bind to.

    Other packages bundle libgomp under hashed names (scikit-learn's ``libgomp-<hash>.so``);
    those are separate runtimes that the launcher does not bind to, so they do not matter here.
    """
    import torch

    if not sys.platform.startswith("linux") or not torch.backends.openmp.is_available():
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps.splitlines() if line.endswith("/libgomp.so.1")}
    return paths.pop() if len(paths) == 1 else None


def cache_dir() -> Path:
    """Where tilefx keeps what it builds for this user, checked private (``native_cache``)."""
    return native_cache.cache_dir()


def _compile_launcher() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    digest = hashlib.sha1(_SOURCE.encode()).hexdigest()[:12]
    target = cache_dir() / f"libtilefx_parallel_{digest}.so"
    if target.exists() and native_cache.safe_to_load(target):
        return target
    source = target.with_suffix(f".{os.getpid()}.c")  # per process: concurrent first uses race
    source.write_text(_SOURCE)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    command = [compiler, "-O2", "-shared", "-fPIC", "-fopenmp", str(source), "-o", str(partial)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[:500]}")
        native_cache.publish(partial, target)
    finally:
        source.unlink(missing_ok=True)
    return target


def _load_launcher() -> ctypes.CDLL:
    """The launcher library, built again once if the cached copy cannot be loaded (corrupted)."""
    path = _compile_launcher()
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return ctypes.CDLL(str(_compile_launcher()))


@functools.lru_cache(maxsize=1)
def _launcher() -> tuple[int | None, str]:
    """(address of the launcher, why not) — computed once per process."""
    if os.environ.get("TILEFX_OPENMP_LAUNCH", "1") == "0":
        return None, "disabled by TILEFX_OPENMP_LAUNCH=0"
    gomp = _torch_libgomp()
    if gomp is None:
        return None, "no libgomp.so.1 is loaded (torch does not run on libgomp here)"
    try:
        library = _load_launcher()
    except (OSError, RuntimeError) as exc:  # no C compiler, an unwritable cache, a failed build
        why = f"could not build the OpenMP launcher: {exc}"
        native_cache.warn_once(f"tilefx: {why}; compiled kernels keep TVM's thread pool")
        return None, why
    address = ctypes.cast(library.tilefx_parallel_launch, ctypes.c_void_p).value
    log.debug("TVM kernels run their parallel loops on torch's OpenMP threads (%s)", gomp)
    return address, ""


def launcher_address() -> int | None:
    return _launcher()[0]


def available() -> tuple[bool, str]:
    """Whether kernels can share torch's threads, and if not, why."""
    address, why = _launcher()
    return address is not None, why


def share_torch_threads(library_path: str | Path) -> bool:
    """Point the parallel-launch hook of an already loaded kernel library at torch's threads.

    Call after ``tvm.runtime.load_module(library_path)`` (which sets the hook to TVM's pool).
    Returns False, leaving TVM's pool in place, when sharing is not available.
    """
    address = launcher_address()
    if address is None:
        return False
    try:
        hook = ctypes.c_void_p.in_dll(ctypes.CDLL(str(library_path)), "__TVMBackendParallelLaunch")
    except (OSError, ValueError) as exc:  # a TVM whose libraries no longer expose the hook
        log.warning("kernel %s keeps TVM's thread pool: %s", library_path, exc)
        return False
    hook.value = address
    return True


@functools.cache
def keep_tvm_pool_asleep() -> None:
    """Let TVM's pool workers sleep at once after each kernel, unless the user set a spin count.

    Called (once per process) by ``build.KernelCache`` as it hands out a CPU kernel that keeps
    TVM's pool: TVM reads ``TVM_THREAD_POOL_SPIN_COUNT`` when its pool starts, at the first
    parallel kernel, so this is the last moment it can take effect, and processes whose kernels
    run on torch's threads (or that only import tilefx) keep their environment as it was.
    Why: TVM's workers spin (300k iterations by default) after each parallel kernel. Next to
    torch, whose OpenMP workers spin too after each op, a spinning TVM worker shares its core
    with a spinning OpenMP one until the scheduler's time slice ends: a 0.5 ms kernel took
    2.4-5.8 ms when alternated with torch's GEMM (BERT FFN shapes at 90%, 2 threads, AVX2). A
    worker that sleeps instead is woken with priority and preempts the spinner: 0.6-1.0 ms. Even
    2000 spins brought the slowdown back, so the pool sleeps at once.
    """
    if os.environ.setdefault(_SPIN_COUNT, "0") == "0":
        log.debug("TVM's thread pool sleeps between kernels (%s=0)", _SPIN_COUNT)


def contention_warning(torch_threads: int) -> str | None:
    """Why TVM kernels between torch ops may run slow here, or None when they should not.

    None whenever kernels run on torch's threads (one pool, nothing to fight). Otherwise TVM's
    pool is kept from spinning (``keep_tvm_pool_asleep``), but torch's OpenMP (libgomp) workers
    spin for a while after every torch op unless ``OMP_WAIT_POLICY=PASSIVE`` (or a small
    ``GOMP_SPINCOUNT``) was set before torch was imported; libgomp reads it once. A
    TVM kernel right after a torch GEMM then shares a core with a spinning worker: BERT FFN2 at
    50% (32×32 blocks, 2 threads, Intel Xeon) took 1.46 ms median, 4.2 ms at the 90th
    percentile, against 1.35 / 1.48 ms with ``PASSIVE``, which did not slow torch's GEMM. It
    does slow models made of many small torch ops by 10–15% (workers are woken per op), yet a
    compiled MiniLM ran 15.8 ms with it and 23.1 ms without, so the warning recommends it.
    """
    if launcher_address() is not None or torch_threads <= 1 or compat.host_num_cores() <= 1:
        return None
    if os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive" or "GOMP_SPINCOUNT" in os.environ:
        return None
    return (
        "torch's OpenMP workers spin after each op (OMP_WAIT_POLICY is not PASSIVE), which can make "
        "the TVM kernels that follow a torch op up to 3x slower; export OMP_WAIT_POLICY=PASSIVE "
        "before Python starts (it cannot take effect once torch is imported)"
    )
