"""Building kvlab's hand-written C++ kernels (kvlab/layers/cpu_attend.py, kvlab/layers/mhc_kernel.py,
kvlab/layers/moe_kernel.py, kvlab/layers/bf16_kernel.py, kvlab/cache/quant_kernel.py) at first use.

Plain C++17 (no torch headers, no OpenMP), compiled with ``$CXX`` (default ``g++``) into ``$KVLAB_KERNEL_DIR``
(default ``$XDG_CACHE_HOME/kvlab/kernels``, ``~/.cache/kvlab/kernels``) under a name keyed by a hash of the source,
the flags, the compiler's version and the CPU's flags (a ``-march=native`` build never runs on another CPU), written
to a temporary file then renamed (concurrent processes cannot load half a file). Each kernel's module loads the
library with ctypes, warns once and falls back to torch when :func:`build` raises :class:`KernelBuildError`
(:class:`Library` does all of it for a kernel).

The wrappers' device check, eager and traced alike: ``t.is_cpu``. Eager, an attribute read (~65 ns; ``t.device.type``
builds a device object, ~1 us, a few a kernel call); in a trace dynamo answers it from the fake tensor's device, with
no guard more than ``device.type``'s (torch 2.13: the same guard list for a step's input, and for a parameter or an
intermediate tensor, fullgraph). Written inline, not through a helper function: a Python call per tensor costs more
than the read itself (a 1-row product's check 2.26 -> 2.37 us through one, docs/performance.md).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path


class KernelBuildError(RuntimeError):
    """A C++ kernel could not be built or loaded (turned into a warning and the fallback path)."""


def switch(variable: str) -> bool:
    """A kernel's on-switch from the environment: on unless ``variable`` is ``0``, ``off``, ``false`` or ``no``
    (each kernel module keeps the result as its ``ENABLED``, which tests and benchmarks patch)."""
    return os.environ.get(variable, "1").strip().lower() not in ("0", "off", "false", "no")


def cache_dir() -> Path:
    """Where built kernels are kept: ``$KVLAB_KERNEL_DIR``, else ``$XDG_CACHE_HOME/kvlab/kernels``, else
    ``~/.cache/kvlab/kernels``."""
    if os.environ.get("KVLAB_KERNEL_DIR"):
        return Path(os.environ["KVLAB_KERNEL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvlab" / "kernels"


def cpu_flags() -> str:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``), else the platform's processor name: part of the build key."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def compiler() -> str:
    """The C++ compiler's path (``$CXX``, default ``g++``). Raises :class:`KernelBuildError`."""
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise KernelBuildError(f"no C++ compiler ({cxx!r} not found; set CXX)")
    return path


def headers(source: Path) -> list[Path]:
    """The headers ``source`` includes from its own folder (``#include "name"`` lines; not followed further)."""
    found = []
    for line in source.read_text().splitlines():
        m = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
        if m and (source.parent / m.group(1)).is_file():
            found.append(source.parent / m.group(1))
    return found


def key(cxx: str, source: Path, flags: tuple[str, ...]) -> str:
    """The build's key: a hash of the source and the headers it includes from its folder, the flags, the compiler's
    version and the CPU's flags."""
    try:
        version = subprocess.run([cxx, "--version"], check=False, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"{cxx} --version failed: {e}") from e
    parts = [source.read_bytes(), *(h.read_bytes() for h in headers(source)), " ".join(flags).encode(),
             version.encode(), cpu_flags().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


def build(source: Path, flags: tuple[str, ...], directory: Path | None = None) -> Path:
    """The shared library of ``source`` for this compiler, ``flags`` and CPU: built once (atomically) into
    :func:`cache_dir` (or ``directory``) as ``<source's stem>-<key>.so`` and reused. Raises :class:`KernelBuildError`."""
    cxx = compiler()
    directory = directory or cache_dir()
    path = directory / f"{source.stem}-{key(cxx, source, flags)}.so"
    if path.exists():
        return path
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{source.stem}-", suffix=".so.tmp")
        os.close(fd)
    except OSError as e:
        raise KernelBuildError(f"cannot write to {directory}: {e} (set KVLAB_KERNEL_DIR)") from e
    try:
        r = subprocess.run([cxx, *flags, "-o", tmp, str(source)], check=False, capture_output=True, text=True,
                           timeout=300)
        if r.returncode:
            raise KernelBuildError(f"{cxx} failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
        os.replace(tmp, path)  # atomic: a concurrent process loads either nothing or the whole file
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"{cxx} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class Library:
    """A kernel's shared library, built (:func:`build`) and loaded with ctypes at the first :meth:`get`, once
    (thread-safe): ``version`` is ``(function, number)`` the library must return, ``signatures`` each function's
    ``(argtypes, restype)``. A failed build or load: one warning (``fallback`` says what runs instead), then None."""

    def __init__(self, source: Path, flags: tuple[str, ...], version: tuple[str, int],
                 signatures: dict[str, tuple[list, type]], fallback: str) -> None:
        self.source, self.flags, self.version, self.signatures, self.fallback = source, flags, version, signatures, fallback
        self.lib: ctypes.CDLL | None = None
        self.failed = False
        self._lock = threading.Lock()

    def _load(self) -> ctypes.CDLL:
        path = build(self.source, self.flags)
        lib = ctypes.CDLL(str(path))
        name, number = self.version
        if getattr(lib, name)() != number:
            raise KernelBuildError(f"{path}: not this version of the kernel")
        for fn, (args, res) in self.signatures.items():
            getattr(lib, fn).argtypes, getattr(lib, fn).restype = args, res
        return lib

    def get(self) -> ctypes.CDLL | None:
        """The loaded library (built now if needed), or None (warned once) when that failed."""
        if self.lib is None and not self.failed:
            with self._lock:
                if self.lib is None and not self.failed:
                    try:
                        self.lib = self._load()
                    except (KernelBuildError, OSError, AttributeError) as e:
                        self.failed = True
                        warnings.warn(f"kvlab: C++ kernel {self.source.name} unavailable ({e}); {self.fallback}",
                                      stacklevel=3)
        return self.lib


__all__ = ["KernelBuildError", "Library", "build", "cache_dir", "compiler", "cpu_flags", "headers", "key", "switch"]
