"""Load a fresh copy of a kernels/ module with TRITON_INTERPRET=1, so its Triton code runs on the CPU (tests only)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def interpreted(filename: str) -> ModuleType:
    """kernels/<filename> compiled under the Triton interpreter, as module `_interp_<stem>` (skips without triton)."""
    pytest.importorskip("triton")
    name = f"_interp_{Path(filename).stem}"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "kernels" / filename)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    finally:  # put back what was there: other tests (cce_common) may rely on a session-wide "1"
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        elif old != "1":
            os.environ["TRITON_INTERPRET"] = old
    return mod
