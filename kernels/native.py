"""The one builder of the compiled C++ codecs (rANS, FM-Delta): compile a source on first use with the C++ compiler of
`settings.cxx` (else g++, c++ or clang++), cache the shared library under `settings.cache_dir/native`, keyed by the
source, the flags and the CPU model (`-march=native` code is host-specific), and load it with ctypes. Parallel
processes build it once (file lock, atomic rename). None, with one warning, where nothing can be built or
`settings.native` is off: callers fall back to their torch path."""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

from memfit.kernels.settings import SETTINGS

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compiler() -> str | None:
    return SETTINGS.cxx or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def build(name: str, src: Path, flags: tuple[str, ...] = FLAGS) -> Path:
    """The cached shared library of `src`, compiling it first if needed."""
    cxx = compiler()
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++, c++ or clang++) on PATH; set CXX or kernels.cxx")
    key = hashlib.sha256(src.read_bytes() + " ".join(flags).encode() + cpu_model().encode()).hexdigest()[:16]
    folder = Path(SETTINGS.cache_dir).expanduser() / "native"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}_{platform.machine()}_{key}.so"
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                tmp_so = Path(tmp) / out.name
                subprocess.run([cxx, *flags, str(src), "-o", str(tmp_so)], check=True, capture_output=True, text=True)
                os.replace(tmp_so, out)
    return out


@cache
def load(name: str, src: str) -> ctypes.CDLL | None:
    """The loaded library, or None (warning once) when it cannot be built or native code is switched off."""
    if not SETTINGS.native:
        return None
    try:
        return ctypes.CDLL(str(build(name, Path(src))))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"native {name} codec unavailable ({detail.strip()[:200]}); using the slower torch path",
                      stacklevel=2)
        return None
