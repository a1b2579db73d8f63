"""experiments/kernel_resources.py compiles for sm_90 without a GPU and reads the cubin: a copy kernel of 512 fp32 per
program on 4 warps holds 4 contiguous values per thread, so its SASS must have exactly one 128-bit load and one
128-bit store, no spill; the same kernel on misaligned pointers (no 16-byte divisibility) must fall back to 32-bit
accesses."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from experiments.kernel_resources import BIN, compile_sm90, resources  # noqa: E402

if not all((BIN / tool).exists() for tool in ("ptxas", "cuobjdump", "nvdisasm")):  # pragma: no cover
    pytest.skip(f"this triton ships no CUDA binary tools in {BIN}", allow_module_level=True)


@triton.jit
def _copy(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)


def test_vectorised_copy_has_one_128_bit_load_and_store():
    r = resources(compile_sm90(_copy, {"src": "*fp32", "dst": "*fp32", "n": "i32"}, {"BLOCK": 512}, warps=4,
                               div16=("n",)))
    assert r["mix"].get("LDG.E.128") == 1 and r["mix"].get("STG.E.128") == 1, r
    assert r["spill"] == 0 and 0 < r["regs"] <= 32 and r["instructions"] > 0


def test_kernel_defined_under_the_interpreter_compiles_the_same():
    """Full runs used to fail here: with TRITON_INTERPRET=1 left set by another module, `@triton.jit` made interpreted
    functions. compile_sm90 re-wraps them, and no test may leave the variable set (tests/conftest.py's guard)."""
    from interp import _env

    with _env("1"):
        interpreted_copy = triton.jit(_copy.fn)
    assert type(interpreted_copy) is not type(_copy)
    sig, meta = {"src": "*fp32", "dst": "*fp32", "n": "i32"}, {"BLOCK": 512}
    assert resources(compile_sm90(interpreted_copy, sig, meta, div16=("n",))) == \
        resources(compile_sm90(_copy, sig, meta, div16=("n",)))


def test_unaligned_copy_uses_scalar_accesses():
    r = resources(compile_sm90(_copy, {"src": "*fp32", "dst": "*fp32", "n": "i32"}, {"BLOCK": 512}, aligned=False))
    assert "LDG.E.128" not in r["mix"] and r["mix"].get("LDG.E") == 4 and r["mix"].get("STG.E") == 4, r


@triton.jit
def _hold(src, dst, BLOCK: tl.constexpr):
    """Keeps BLOCK values live across a dependent chain: far more values a thread than it has registers."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(src + offs)
    y = tl.cumsum(x * x, 0)
    tl.store(dst + offs, x + y / (tl.sum(x, 0) + 1.0))


def test_register_spills_are_reported():
    r = resources(compile_sm90(_hold, {"src": "*fp32", "dst": "*fp32"}, {"BLOCK": 16384}, warps=1))
    assert r["spill"] > 1000 and any(k.startswith("STL") for k in r["mix"]), r
