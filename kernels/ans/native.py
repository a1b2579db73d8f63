"""CPU path of the rANS coder: kernels/csrc/ans.cpp compiled on first use and called through ctypes.

Why ctypes and not torch.utils.cpp_extension: the coder needs no torch headers, so a plain `g++ -O3` build takes about a
second instead of a minute, needs no ninja, and the same .so serves any torch version. The build is cached by
memfit.kernels.native (one builder for every C++ codec). `lib()` returns None when no compiler is available: callers then fall
back to the torch reference (kernels/ans/reference.py), which is bit-identical but slow.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from memfit.kernels import native
from memfit.kernels.cpu import idle_cores

_SRC = Path(__file__).resolve().parent.parent / "csrc" / "ans.cpp"

_i64, _i32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL | None:
    """The compiled coder (memfit.kernels.native builds and caches it); None when it cannot be built."""
    dll = native.load("ans", str(_SRC))
    if dll is None:
        return None
    dll.ans_histogram.argtypes = [_ptr, _i64, _ptr, _i32]
    dll.ans_histogram.restype = None
    dll.ans_encode.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _i32, _ptr, _ptr, _ptr, _i32]
    dll.ans_encode.restype = _i64
    dll.ans_compact.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _i32]
    dll.ans_compact.restype = None
    dll.ans_decode.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i32, _ptr, _i32]
    dll.ans_decode.restype = _i64
    return dll


def _p(t: torch.Tensor) -> int:
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.data_ptr()


MIN_WORK_PER_THREAD = 1 << 18  # elements (symbols, weights): below this a thread costs more to start than it saves


def cpu_threads(work: int, min_per_thread: int = MIN_WORK_PER_THREAD) -> int:
    """Threads for `work` elements, so that more threads are never slower than one: torch's setting, capped by the
    cores this process may run on, by the cores other processes leave idle (1-minute load average, this process
    counted as one) and by the work (MIN_WORK_PER_THREAD each). On a busy machine an extra thread only adds waiting:
    the call ends when its last thread does, and a thread whose core is taken by another process runs late (measured
    on a 2-core machine at load 5: 2 threads 12-24% slower than 1; tiny inputs paid the thread start for nothing)."""
    return max(1, min(torch.get_num_threads(), idle_cores(), work // max(1, min_per_thread)))


def to_i32_bits(x: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same bit patterns as int32 (what the C ABI reads)."""
    x = x.to(torch.int64)
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32).contiguous()


def histogram(symbols: torch.Tensor) -> torch.Tensor:
    """Counts of each byte value (int64, 256) of a contiguous CPU uint8 tensor."""
    counts = torch.zeros(256, dtype=torch.int64)
    lib().ans_histogram(_p(symbols), symbols.numel(), _p(counts), cpu_threads(symbols.numel()))
    return counts


def encode(symbols: torch.Tensor, lanes: int, freqs: torch.Tensor, cum: torch.Tensor, prob_bits: int,
           nthreads: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(words int16, lane_offsets int64, final_states int64); freqs/cum are uint32-valued (256,) tensors;
    `nthreads` overrides the automatic choice (tests)."""
    n = symbols.numel()
    per_lane = -(-n // lanes)
    f32 = freqs.to(torch.int32).contiguous()
    c32 = cum.to(torch.int32).contiguous()
    scratch = torch.empty(lanes * per_lane, dtype=torch.int16)
    nwords = torch.empty(lanes, dtype=torch.int64)
    states = torch.empty(lanes, dtype=torch.int32)
    threads = nthreads or cpu_threads(n)
    rc = lib().ans_encode(_p(symbols), n, lanes, _p(f32), _p(c32), prob_bits, _p(scratch), _p(nwords), _p(states),
                          threads)
    if rc < 0:
        i = -rc - 1
        raise ValueError(f"symbol {int(symbols[i])} at index {i} has frequency 0 in the given table")
    offsets = torch.zeros(lanes + 1, dtype=torch.int64)
    torch.cumsum(nwords, 0, out=offsets[1:])
    words = torch.empty(int(offsets[-1]), dtype=torch.int16)
    lib().ans_compact(_p(scratch), per_lane, lanes, _p(offsets), _p(words), threads)
    return words, offsets, states.to(torch.int64) & 0xFFFFFFFF


def decode(words: torch.Tensor, offsets: torch.Tensor, states: torch.Tensor, n: int, lanes: int,
           slot_sym: torch.Tensor | None, freqs: torch.Tensor, cum: torch.Tensor, prob_bits: int,
           nthreads: int | None = None) -> torch.Tensor:
    """Decode to a uint8 tensor (n,); ValueError naming the first inconsistent lane. `slot_sym` None: the C++ code
    builds the slot table from freqs/cum."""
    # keep every converted tensor in a local: a temporary would be freed before the C call reads it
    # numpy, not torch.cat: a parallel torch op wakes torch's thread pool, whose spinning threads then compete with
    # ours for the cores (it made decoding on 2 threads slower than on 1)
    # and no `words.numpy()`: a numpy view makes the words' storage non-resizable, and under FSDP2 those words are
    # slices of its all-gather buffer, which it frees by resizing (memmove copies without a view or a torch op)
    words = words.contiguous()
    buf = np.zeros(words.numel() + 1, np.int16)
    ctypes.memmove(buf.ctypes.data, words.data_ptr(), 2 * words.numel())
    padded = torch.from_numpy(buf)
    st = to_i32_bits(states)
    off = offsets.to(torch.int64).contiguous()
    ss = None if slot_sym is None else slot_sym.contiguous()
    f32 = freqs.to(torch.int32).contiguous()
    c32 = cum.to(torch.int32).contiguous()
    out = torch.empty(n, dtype=torch.uint8)
    rc = lib().ans_decode(_p(padded), _p(off), _p(st), n, lanes, None if ss is None else _p(ss), _p(f32), _p(c32),
                          prob_bits, _p(out), nthreads or cpu_threads(n))
    if rc < 0:
        raise ValueError(f"corrupt rANS stream: lane {-rc - 1} does not decode to its start state")
    return out
