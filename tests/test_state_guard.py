"""tests/conftest.py's process-state guard: a test that leaves state changed fails, and the state is restored."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import _guard


def test_guard_fails_a_leak_and_restores_the_state():
    threads, had = torch.get_num_threads(), os.environ.get("TRITON_INTERPRET")
    guard = _guard("probe")
    next(guard)
    os.environ["TRITON_INTERPRET"] = "0" if had == "1" else "1"
    torch.set_num_threads(threads + 1)
    torch.set_default_dtype(torch.float64)
    with pytest.raises(pytest.fail.Exception, match="probe changed.*TRITON_INTERPRET.*threads.*dtype"):
        next(guard)
    assert os.environ.get("TRITON_INTERPRET") == had and torch.get_num_threads() == threads
    assert torch.get_default_dtype() == torch.float32


def test_guard_passes_what_libraries_set_and_a_clean_test():
    guard = _guard("probe")
    next(guard)
    os.environ["PL_GLOBAL_SEED"] = "1234"  # Lightning's seed_everything: restored silently
    with pytest.raises(StopIteration):
        next(guard)
    assert os.environ.get("PL_GLOBAL_SEED") != "1234"
