"""Multi-core CPU path of the FM-Delta codec: a small C++ file compiled on first use and called through ctypes.

Why native: the per-element work (key map, msb, symbol, variable-length bit packing) is ~20 passes in eager torch and
runs at ~50-130 MB/s on 2 cores; fused in one loop per block it is memory-bound. The torch reference
(`fmdelta_ref.py`) produces the same bytes and is the GPU path and the test oracle.
"""

from __future__ import annotations

import ctypes
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from memfit.kernels import native

log = logging.getLogger(__name__)
SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "fmdelta.cpp"
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_U64 = ctypes.c_uint64


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled library (memfit.kernels.native builds and caches it), or None when it cannot be built or native
    code is switched off: callers fall back to torch."""
    lib = native.load("fmdelta", str(SOURCE))
    if lib is None:
        return None
    lib.fmd_encode.argtypes = [_P, _P, _I64, _INT, _INT, _U64, _I64, _P, _P, _P, _P, _INT]
    lib.fmd_encode.restype = _I64
    lib.fmd_decode.argtypes = [_P, _P, _I64, _INT, _INT, _U64, _I64, _P, _P, _P, _P, _INT]
    lib.fmd_decode.restype = _INT
    return lib


def _ptr(t: torch.Tensor | np.ndarray | None) -> int | None:
    if isinstance(t, np.ndarray):
        return t.ctypes.data
    return None if t is None else t.data_ptr()


def threads(n: int) -> int:
    """Threads for n elements (memfit.kernels.ans.native.cpu_threads: no more than the idle cores and the work can use)."""
    from memfit.kernels.ans.native import cpu_threads

    return cpu_threads(n)


def encode(base: torch.Tensor, ft: torch.Tensor, shift: int, mask: int, block: int,
           counts: torch.Tensor | None = None, nthreads: int | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(symbols uint8 (n,), block_words int64 (nblocks,), words int64) from two same-dtype 1-D CPU int views.

    One pass over the inputs on all threads; `counts` (int64 (256,)), when given, is incremented by the symbol
    histogram gathered in the same pass (so the entropy coder needs no second look at the symbols). `nthreads`
    overrides the automatic choice (tests).
    """
    lib = library()
    assert lib is not None
    n, width = base.numel(), base.element_size()
    nblocks = (n + block - 1) // block
    stride = (block * width * 8 + 63) // 64 + 1
    sym = torch.empty(n, dtype=torch.uint8)
    bw32 = torch.empty(nblocks, dtype=torch.int32)
    words = torch.empty(max(1, nblocks * stride), dtype=torch.int64)
    hist = torch.zeros(256, dtype=torch.int64) if counts is None else counts
    assert hist.dtype == torch.int64 and hist.is_contiguous() and hist.numel() == 256
    total = lib.fmd_encode(_ptr(base), _ptr(ft), n, width, shift, mask, block, _ptr(sym), _ptr(bw32), _ptr(words),
                           _ptr(hist), nthreads or threads(n))
    return sym, bw32.to(torch.int64), words[:total]


def decode(base: torch.Tensor, sym: torch.Tensor, block_words: torch.Tensor, words: torch.Tensor | np.ndarray,
           shift: int, mask: int, block: int, out: torch.Tensor | None = None, nthreads: int | None = None
           ) -> torch.Tensor:
    """Inverse of `encode` (into `out`, a contiguous tensor like `base`, when given); raises ValueError on an
    out-of-range symbol or a raw-bit stream of the wrong length. `words` may be a read-only, unaligned uint8 numpy
    view of the payload (the C++ reader loads it bytewise-safely), which saves a copy."""
    lib = library()
    assert lib is not None
    n, width = base.numel(), base.element_size()
    off = torch.cumsum(block_words, 0) - block_words
    bw32 = block_words.to(torch.int32)
    if out is None:
        out = torch.empty_like(base)
    assert out.dtype == base.dtype and out.numel() == n and out.is_contiguous()
    rc = lib.fmd_decode(_ptr(base), _ptr(sym), n, width, shift, mask, block, _ptr(words), _ptr(off), _ptr(bw32),
                        _ptr(out), nthreads or threads(n))
    if rc == 1:
        raise ValueError("corrupt FM-Delta payload: symbol outside the alphabet")
    if rc == 2:
        raise ValueError("corrupt FM-Delta payload: raw-bit stream does not match the symbols")
    return out
