"""Run kernels/ Triton code on the CPU under TRITON_INTERPRET=1 without leaking that setting (tests only).

Triton reads TRITON_INTERPRET when a `@triton.jit` function is defined, so the interpreter is a property of a module
object. `interpreted(file)` loads a private copy of one kernel file; `interpreter()` (a context manager, used by module
fixtures) sets the variable and swaps fresh copies of every Triton-defining `memfit.kernels` module in, and restores
the previous modules, package attributes and environment on exit, so no other test sees interpreted kernels.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "memfit.kernels"


def triton_modules() -> list[str]:
    """Names of the kernels/ modules that define Triton functions (their interpreter mode is fixed at import)."""
    return sorted(_module_name(p) for p in (ROOT / "kernels").rglob("*.py") if "@triton.jit" in p.read_text())


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT / "kernels").with_suffix("").parts
    return ".".join((PACKAGE, *(parts[:-1] if parts[-1] == "__init__" else parts)))


@contextmanager
def _env(value: str | None) -> Iterator[None]:
    old = os.environ.get("TRITON_INTERPRET")
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def interpreted(filename: str) -> ModuleType:
    """kernels/<filename> (e.g. "nf4/matmul.py") compiled under the Triton interpreter, as a private module (skips
    without triton)."""
    pytest.importorskip("triton")
    name = "_interp_" + filename.removesuffix(".py").replace("/", "_")
    with _env("1"):
        spec = importlib.util.spec_from_file_location(name, ROOT / "kernels" / filename)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod


@contextmanager
def interpreter() -> Iterator[None]:
    """TRITON_INTERPRET=1 with fresh interpreted copies of the Triton-defining kernels modules for the duration."""
    pytest.importorskip("triton")
    import importlib

    names = triton_modules()
    parents = {n: importlib.import_module(n.rsplit(".", 1)[0]) for n in names}
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    attrs = {n: getattr(parents[n], n.rsplit(".", 1)[1]) for n in names if hasattr(parents[n], n.rsplit(".", 1)[1])}
    with _env("1"):
        try:
            yield
        finally:
            for n in names:
                sys.modules.pop(n, None)
                if hasattr(parents[n], n.rsplit(".", 1)[1]):
                    delattr(parents[n], n.rsplit(".", 1)[1])
            sys.modules.update(saved)
            for n, mod in attrs.items():
                setattr(parents[n], n.rsplit(".", 1)[1], mod)
