"""Every behaviour switch of the kernels and codecs, read once from the environment at import and settable from the
run config (`kernels:` in conf/train.yaml, applied by `configure`), so nothing in library code reads os.environ.

    tune_cache       MEMFIT_TUNE_CACHE       file of the first-use tile timings ("" or "0": off; unset: the default)
    cce_autotune     CCE_AUTOTUNE=0          time the CCE forward's tile candidates on first use (default on)
    nf4_autotune     NF4_MM_AUTOTUNE=0       time the NF4 matmul's tile candidates on first use (default on)
    nf4_verbose      NF4_MM_VERBOSE=1        print the NF4 tile timings
    fast_launch      MEMFIT_FAST_LAUNCH=1    relaunch compiled NF4 kernels without Triton's binder (opt-in)
    neuzip_prefetch  MEMFIT_NEUZIP_PREFETCH=1  decode the next NeuZip weight on a side stream (opt-in)
    native           MEMFIT_NO_NATIVE=1      use the compiled C++ codecs on the CPU (default on; off: torch paths)
    cache_dir        MEMFIT_CACHE            where compiled native libraries and tile timings live ($XDG_CACHE_HOME/memfit,
                                             else ~/.cache/memfit)
    cxx              CXX                     the C++ compiler for the native codecs (default: g++, c++ or clang++)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


def _on(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    return default if v is None else v not in ("", "0")


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


@dataclass
class Settings:
    tune_cache: str | None = None
    cce_autotune: bool = True
    nf4_autotune: bool = True
    nf4_verbose: bool = False
    fast_launch: bool = False
    neuzip_prefetch: bool = False
    native: bool = True
    cache_dir: str = str(_cache_root() / "memfit")
    cxx: str | None = None

    @classmethod
    def from_env(cls) -> Settings:
        return cls(tune_cache=os.environ.get("MEMFIT_TUNE_CACHE"), cce_autotune=_on("CCE_AUTOTUNE", True),
                   nf4_autotune=_on("NF4_MM_AUTOTUNE", True), nf4_verbose=_on("NF4_MM_VERBOSE", False),
                   fast_launch=_on("MEMFIT_FAST_LAUNCH", False), neuzip_prefetch=_on("MEMFIT_NEUZIP_PREFETCH", False),
                   native=not _on("MEMFIT_NO_NATIVE", False),
                   cache_dir=os.environ.get("MEMFIT_CACHE") or str(_cache_root() / "memfit"),
                   cxx=os.environ.get("CXX"))


SETTINGS = Settings.from_env()


def configure(**values: Any) -> Settings:
    """Set fields by name (None leaves a field as it is); an unknown name fails, naming the valid ones."""
    names = {f.name for f in fields(Settings)}
    for k, v in values.items():
        if k not in names:
            raise ValueError(f"kernels.{k} is not a setting; choose from: {', '.join(sorted(names))}")
        if v is not None:
            setattr(SETTINGS, k, v)
    return SETTINGS
