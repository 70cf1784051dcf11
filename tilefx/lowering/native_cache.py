"""Where tilefx keeps the native code it builds, and the checks before it loads any of it.

Compiled kernels and the OpenMP launcher are shared libraries that tilefx loads into the process
(``tvm.runtime.load_module``, ``ctypes.CDLL``), and their names are computable. A cache in a
predictable path under a world-writable directory (the old ``<tmp>/tilefx-<uid>``) let another
user create it first and plant a library that the next ``tilefx.compile`` ran as the victim. So:

- the cache is per user, under the user's home: ``$TILEFX_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/tilefx``, else ``~/.cache/tilefx``;
- directories are created ``0o700`` and libraries published ``0o700`` (never group/other-writable);
- before anything is loaded, its directory and the file itself must be owned by this user and not
  writable by group or others (a file must also be a regular file, not a symlink). A directory
  that fails is refused with one warning and a fresh private temporary directory is used instead
  (``tempfile.mkdtemp``: ``0o700``, removed at exit); a file that fails is not loaded and is
  rebuilt.

Faults (a cache directory that cannot be created or written, a library that cannot be exported
or loaded) degrade the same way, each with one ``RuntimeWarning``, never a crash. TVM-free.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import stat
import tempfile
import warnings
from pathlib import Path

__all__ = ["cache_dir", "cache_root", "private_dir", "publish", "safe_to_load", "warn_once"]

_PRIVATE = 0o700
_SHARED_WRITE = stat.S_IWGRP | stat.S_IWOTH


def cache_root() -> Path:
    """The configured cache directory (not yet checked): see the module docstring."""
    configured = os.environ.get("TILEFX_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec's rule
    return base / "tilefx"


def cache_dir() -> Path:
    """The directory tilefx may build into and load from: :func:`cache_root`, if it is private."""
    return private_dir(cache_root())


def private_dir(path: Path) -> Path:
    """``path`` (created ``0o700`` if missing) when only this user can write it, else a fresh private
    temporary directory. Refusing warns once per path and process."""
    return _checked_dir(str(Path(path).absolute()))


@functools.cache
def _checked_dir(path: str) -> Path:
    directory = Path(path)
    try:
        directory.mkdir(mode=_PRIVATE, parents=True, exist_ok=True)
    except OSError as exc:
        return _refuse(directory, f"it cannot be created ({exc.strerror or exc})")
    problem = _ownership_problem(directory, want_dir=True)
    if not problem and not os.access(directory, os.W_OK | os.X_OK):
        problem = "it is not writable"
    return _refuse(directory, problem) if problem else directory


def safe_to_load(path: Path) -> bool:
    """Whether the library at ``path`` and its directory are this user's alone (see the module)."""
    problem = _ownership_problem(path.parent, want_dir=True) or _ownership_problem(path, want_dir=False)
    if problem:
        warn_once(f"tilefx: not loading {path}: {problem}; building it again instead")
    return not problem


def publish(partial: Path, path: Path) -> None:
    """Move a freshly built library into place, readable and writable by this user only.

    Atomic: a concurrent reader never sees half a library."""
    partial.chmod(_PRIVATE)
    partial.replace(path)


def warn_once(message: str) -> None:
    """One RuntimeWarning per distinct message and process: a fault repeats for every kernel."""
    if message in _warned:
        return
    _warned.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


_warned: set[str] = set()


def _ownership_problem(path: Path, *, want_dir: bool) -> str:
    """Why ``path`` is not this user's alone, or "". A directory may be reached through a symlink
    (its target is what is checked); a library may not (the link could be turned elsewhere)."""
    try:
        info = path.stat() if want_dir else path.lstat()
    except OSError as exc:
        return f"it cannot be inspected ({exc.strerror or exc})"
    kind = stat.S_ISDIR if want_dir else stat.S_ISREG
    if not kind(info.st_mode):
        return f"{path} is not a {'directory' if want_dir else 'regular file'} (a symlink or other)"
    if info.st_uid != os.getuid():
        return f"{path} is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    if info.st_mode & _SHARED_WRITE:
        return f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return ""


def _refuse(directory: Path, problem: str) -> Path:
    fallback = _private_temp_dir()
    warn_once(
        f"tilefx: not using the cache directory {directory}: {problem}; building kernels in the private "
        f"temporary directory {fallback} instead (set TILEFX_CACHE_DIR to a directory only you can write)"
    )
    return fallback


@functools.lru_cache(maxsize=1)
def _private_temp_dir() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="tilefx-"))  # 0o700, a fresh unpredictable name
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory
