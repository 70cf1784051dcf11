"""The native-code cache: per user, private, checked before loading; faults degrade with one warning.

A planted library (a file another user could have written) is never loaded: these tests plant
garbage under the names tilefx would load and record every library TVM or ctypes opens.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import tvm

import tilefx
from tilefx.lowering import native_cache, openmp_launch
from tilefx.lowering.build import KernelCache, compile_graph

PLANTED = b"\x7fELF planted by another user"
needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test sees its own warnings, directory checks and kernels (none reused from memory)."""
    monkeypatch.setattr(native_cache, "_warned", set())
    monkeypatch.setattr(KernelCache, "_memory", {})
    native_cache._checked_dir.cache_clear()
    yield
    native_cache._checked_dir.cache_clear()


@pytest.fixture(scope="module")
def pruned() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    recipe = tilefx.Recipe(blocks=tilefx.BlockPruning(block=(4, 1), sparsity=0.5, reorder="none"))
    return tilefx.optimize(model, (x,), recipe=recipe), x


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The content of every library TVM loads (a planted one would show up here)."""
    seen: list[bytes] = []
    original = tvm.runtime.load_module

    def load_module(path: str, *args: Any) -> Any:
        seen.append(Path(path).read_bytes())
        return original(path, *args)

    monkeypatch.setattr(tvm.runtime, "load_module", load_module)
    return seen


def _compile(pruned: tuple[torch.fx.GraphModule, torch.Tensor], cache_dir: Path) -> None:
    gm, x = pruned
    out = compile_graph(gm, "llvm", cache_dir=cache_dir, fallback="never")
    assert all(choice.lowered for choice in out.meta["lowering_choices"])
    with torch.no_grad():
        torch.testing.assert_close(out(x), gm(x), rtol=1e-4, atol=1e-4)


def _kernel_names(pruned: tuple[torch.fx.GraphModule, torch.Tensor], tmp_path: Path) -> list[str]:
    good = tmp_path / "good"
    _compile(pruned, good)
    KernelCache._memory.clear()
    return sorted(p.name for p in good.glob("bsr_*.so"))


def _private(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def test_cache_is_per_user_under_the_xdg_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TILEFX_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert native_cache.cache_root() == tmp_path / "home" / ".cache" / "tilefx"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: only absolute paths count
    assert native_cache.cache_root() == tmp_path / "home" / ".cache" / "tilefx"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native_cache.cache_dir() == tmp_path / "xdg" / "tilefx"
    assert stat.S_IMODE((tmp_path / "xdg" / "tilefx").stat().st_mode) & 0o077 == 0
    monkeypatch.setenv("TILEFX_CACHE_DIR", str(tmp_path / "mine"))
    assert native_cache.cache_dir() == tmp_path / "mine" == openmp_launch.cache_dir()


def test_a_directory_others_can_write_is_refused_for_a_private_temp_dir(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.warns(RuntimeWarning, match="writable by group or others") as caught:
        used = native_cache.private_dir(shared)
        assert native_cache.private_dir(shared) == used  # one warning per directory
    assert len(caught) == 1
    assert used != shared and used.stat().st_uid == os.getuid()
    assert stat.S_IMODE(used.stat().st_mode) == 0o700


def test_kernels_planted_in_a_shared_directory_are_never_loaded(
    pruned: tuple[torch.fx.GraphModule, torch.Tensor], tmp_path: Path, loaded: list[bytes]
) -> None:
    names = _kernel_names(pruned, tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in names:
        (shared / name).write_bytes(PLANTED)
    shared.chmod(0o777)
    loaded.clear()
    with pytest.warns(RuntimeWarning, match=f"not using the cache directory {shared}"):
        _compile(pruned, shared)
    assert loaded and PLANTED not in loaded
    assert all((shared / name).read_bytes() == PLANTED for name in names)  # left alone, not used


@pytest.mark.parametrize("how", ["group-writable", "symlink", "other-owner"])
def test_a_planted_kernel_in_a_private_directory_is_refused_and_rebuilt(
    pruned: tuple[torch.fx.GraphModule, torch.Tensor], tmp_path: Path, loaded: list[bytes], how: str
) -> None:
    if how == "other-owner" and os.getuid() != 0:
        pytest.skip("making a file owned by another user needs root")
    names = _kernel_names(pruned, tmp_path)
    cache = _private(tmp_path / "cache")
    for name in names:
        planted = cache / name
        if how == "symlink":
            (tmp_path / "elsewhere.so").write_bytes(PLANTED)
            planted.symlink_to(tmp_path / "elsewhere.so")
            continue
        planted.write_bytes(PLANTED)
        planted.chmod(0o666 if how == "group-writable" else 0o700)
        if how == "other-owner":
            os.chown(planted, 4242, -1)
    loaded.clear()
    with pytest.warns(RuntimeWarning, match="not loading"):
        _compile(pruned, cache)
    assert loaded and PLANTED not in loaded
    for name in names:  # replaced by the library tilefx built, published owner-only
        info = (cache / name).lstat()
        assert stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


@needs_cc
def test_a_planted_openmp_launcher_is_never_loaded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    digest = hashlib.sha1(openmp_launch._SOURCE.encode()).hexdigest()[:12]
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / f"libtilefx_parallel_{digest}.so").write_bytes(PLANTED)
    shared.chmod(0o777)
    monkeypatch.setenv("TILEFX_CACHE_DIR", str(shared))
    opened: list[bytes] = []
    original = ctypes.CDLL

    def cdll(name: str, *args: Any, **kwargs: Any) -> ctypes.CDLL:
        opened.append(Path(name).read_bytes())
        return original(name, *args, **kwargs)

    monkeypatch.setattr(openmp_launch.ctypes, "CDLL", cdll)
    with pytest.warns(RuntimeWarning, match="not using the cache directory"):
        library = openmp_launch._load_launcher()
    assert opened and PLANTED not in opened
    assert library.tilefx_parallel_launch is not None


@needs_cc
def test_a_corrupted_launcher_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    digest = hashlib.sha1(openmp_launch._SOURCE.encode()).hexdigest()[:12]
    cache = _private(tmp_path / "cache")
    corrupted = cache / f"libtilefx_parallel_{digest}.so"
    corrupted.write_bytes(b"\x7fELF truncated")
    corrupted.chmod(0o700)
    monkeypatch.setenv("TILEFX_CACHE_DIR", str(cache))
    assert openmp_launch._load_launcher().tilefx_parallel_launch is not None
    assert corrupted.read_bytes() != b"\x7fELF truncated"


def test_a_corrupted_cached_kernel_is_rebuilt_with_one_warning(
    pruned: tuple[torch.fx.GraphModule, torch.Tensor], tmp_path: Path
) -> None:
    names = _kernel_names(pruned, tmp_path)
    cache = _private(tmp_path / "cache")
    for name in names:  # truncated copies: an interrupted write, a full disk
        (cache / name).write_bytes((tmp_path / "good" / name).read_bytes()[:100])
        (cache / name).chmod(0o700)
    with pytest.warns(RuntimeWarning, match="cannot be loaded") as caught:
        _compile(pruned, cache)
    assert len([w for w in caught if "cannot be loaded" in str(w.message)]) == len(names)
    assert all((cache / name).stat().st_size > 100 for name in names)


def test_an_unwritable_cache_directory_falls_back_with_one_warning(
    pruned: tuple[torch.fx.GraphModule, torch.Tensor], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.warns(RuntimeWarning, match="cannot be created") as caught:
        _compile(pruned, blocker / "cache")
    assert len(caught) == 1


def test_a_kernel_that_cannot_be_exported_stays_in_memory_with_one_warning(
    pruned: tuple[torch.fx.GraphModule, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_linker(self: Any, path: str, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("cc: command not found")

    monkeypatch.setattr(tvm.runtime.Executable, "export_library", no_linker)
    with pytest.warns(RuntimeWarning, match="cannot write kernels to .*cc: command not found") as caught:
        _compile(pruned, _private(tmp_path / "cache"))
    assert len(caught) == 1
    assert not list((tmp_path / "cache").glob("bsr_*.so"))


def test_no_c_compiler_keeps_tvms_thread_pool_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if openmp_launch._torch_libgomp() is None:
        pytest.skip("torch does not run on libgomp here: the launcher is never built")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TILEFX_CACHE_DIR", str(_private(tmp_path / "cache")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = openmp_launch._launcher.__wrapped__()
        second = openmp_launch._launcher.__wrapped__()
    assert first[0] is None and second[0] is None and "could not build the OpenMP launcher" in first[1]
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
