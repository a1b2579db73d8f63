"""CPU codec threads (issue 17 defect 7): more torch threads must never make FM-Delta slower than one.

The cause was torch ops on the hot path that run in torch's OpenMP pool (repeat_interleave parallelises even a 4096-
slot table, cat of the rANS words): on a busy 2-core machine each wakes the pool for milliseconds and leaves threads
spinning against ours. The structural test records every torch call made while a CPU tensor is delta-coded and
rANS-coded: none may be repeat_interleave, and none may compute over a parallel grain (32768 elements) or more; only
views, allocations and no-op conversions may touch the large tensors (the per-element work is C++ or numpy). The
timing test codes 64 small tensors (as MiniLM's biases and norms) on 1 and 2 threads. On the tree before this fix
both fail: repeat_interleave and a 500k-element cat are called, and 2 threads were 10-17x slower than 1 here."""

from __future__ import annotations

import time

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from memfit.kernels import cpu
from memfit.kernels.ans import ANSEncoded, ans_decode, ans_encode
from memfit.kernels.ans import native as ans_cpu
from memfit.kernels.fmdelta import decode_delta, encode_delta
from memfit.kernels.fmdelta import native as fmdelta_native

GRAIN = 32768  # at::internal::GRAIN_SIZE: below it a torch op runs on the calling thread
METADATA = {"__get__", "__getitem__", "__len__", "dim", "numel", "element_size", "data_ptr", "is_contiguous",
            "numpy", "detach", "view", "size", "stride", "empty", "empty_like", "device", "dtype", "storage_offset",
            "__setitem__", "__bool__", "__int__", "__index__"}
NO_COPY = {"contiguous", "to", "cpu", "reshape"}  # fine only when they return the same memory


class Recorder(TorchFunctionMode):
    """Every torch call that computes over >= GRAIN elements, or that is known to parallelise at any size."""

    def __init__(self) -> None:
        super().__init__()
        self.bad: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        ins = [a for a in tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        big = max([t.numel() for t in ins + outs] or [0]) >= GRAIN
        if name == "repeat_interleave" or (big and name not in METADATA and not (
                name in NO_COPY and ins and outs and outs[0].data_ptr() == ins[0].data_ptr())):
            self.bad.append(f"{name} over {max(t.numel() for t in ins + outs)} elements")
        return out


@pytest.mark.skipif(fmdelta_native.library() is None or ans_cpu.lib() is None, reason="no C++ compiler")
def test_no_torch_thread_pool_work_on_the_cpu_hot_path() -> None:
    g = torch.Generator().manual_seed(0)
    base = 0.02 * torch.randn(1 << 20, generator=g)
    ft = base + 2e-5 * torch.randn(1 << 20, generator=g).sign()
    sym = (torch.rand(1 << 20, generator=g) * 5).to(torch.uint8)
    with Recorder() as rec:
        meta, parts = encode_delta(base, ft)
        out = decode_delta(base, meta, b"".join(parts))
        back = ans_decode(ANSEncoded.from_bytes(ans_encode(sym).to_bytes()))
    assert rec.bad == []
    assert torch.equal(out.view(torch.int32), ft.view(torch.int32)) and torch.equal(back, sym)


def _small_tensors() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    base = [0.02 * torch.randn(384 * (1 + i % 4), generator=g) for i in range(64)]
    return base, [b + 2e-5 * torch.randn(b.shape, generator=g).sign() for b in base]


def _code_all(base: list[torch.Tensor], ft: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for b, f in zip(base, ft):
        meta, parts = encode_delta(b, f)
        decode_delta(b, meta, b"".join(parts))
    return time.perf_counter() - t0


def test_two_threads_not_slower_than_one_on_small_tensors() -> None:
    base, ft = _small_tensors()
    old = torch.get_num_threads()
    best = {1: float("inf"), 2: float("inf")}
    try:
        _code_all(base, ft)  # warm-up (native builds, allocator)
        for _ in range(5):  # interleaved, best of 5: noise from other processes hits both alike
            for n in (1, 2):
                torch.set_num_threads(n)
                best[n] = min(best[n], _code_all(base, ft))
    finally:
        torch.set_num_threads(old)
    assert best[2] <= 2 * best[1] + 0.01, best


def test_thread_count_follows_cores_load_and_work(monkeypatch) -> None:
    """cpu_threads: torch's setting, capped by the usable cores, the idle ones (load average, this process counted
    as one) and the work; never below 1."""
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        cases = [  # (load, work) -> threads
            ((1.0, 1 << 30), 8), ((0.0, 1 << 30), 8), ((12.0, 1 << 30), 5), ((40.0, 1 << 30), 1),
            ((1.0, 3 * ans_cpu.MIN_WORK_PER_THREAD), 3), ((1.0, 100), 1), ((1.0, 0), 1),
        ]
        for (load, work), want in cases:
            monkeypatch.setattr(cpu.os, "getloadavg", lambda load=load: (load, load, load))
            assert ans_cpu.cpu_threads(work) == want, (load, work)
        torch.set_num_threads(32)
        monkeypatch.setattr(cpu.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
        assert ans_cpu.cpu_threads(1 << 30) == 16  # no more than the cores
    finally:
        torch.set_num_threads(old)
