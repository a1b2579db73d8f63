"""kernels/launch.Fast with a stand-in for a jitted kernel (its compiled kernel records launches): the first call of
a specialisation goes through `kernel[grid]`, later ones call the compiled kernel with every parameter in order
(defaults filled in), and anything Triton specialises on differently (alignment, an int's divisibility, 1 or 64-bit
range, dtype, a constexpr) compiles again; hooks, unknown argument kinds and the off switch use Triton's path."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from memfit.kernels import launch
from memfit.kernels.settings import SETTINGS


class FakeCompiled:
    def __init__(self, log: list):
        self.log, self.function, self.packed_metadata = log, "fn", "meta"

    def run(self, *a):
        self.log.append(("run", a))


class FakeKernel:
    """Parameters (x_ptr, n, scale, BLOCK: constexpr, FLAG: constexpr = 7), like a JITFunction's `params`."""

    def __init__(self):
        def signature(x_ptr, n, scale, BLOCK, FLAG=7):
            pass

        self.params = [SimpleNamespace(name=p.name, _param=p) for p in inspect.signature(signature).parameters.values()]
        self.log: list = []
        self.compiles = 0

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.compiles += 1
            self.log.append(("jit", grid, args, kwargs))
            return FakeCompiled(self.log)

        return call


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(SETTINGS, "fast_launch", True)
    monkeypatch.setattr(launch, "_device_and_stream", lambda: (0, 1234))
    monkeypatch.setattr(launch, "_hooks", lambda: (None, None))
    k = FakeKernel()
    return k, launch.Fast(k)


def test_repeat_call_runs_the_compiled_kernel_with_all_parameters(fast):
    k, f = fast
    x = torch.empty(64)
    f[(3, 2)](x, 4096, 0.5, BLOCK=128, num_warps=4)
    assert k.compiles == 1 and k.log[-1] == ("jit", (3, 2), (x, 4096, 0.5), {"BLOCK": 128, "num_warps": 4})
    f[(5,)](x, 8192, 0.25, BLOCK=128, num_warps=4)  # same specialisation: new values, no new compile
    assert k.compiles == 1
    assert k.log[-1] == ("run", (5, 1, 1, 1234, "fn", "meta", None, None, None, x, 8192, 0.25, 128, 7))


@pytest.mark.parametrize("change", ["misaligned", "dtype", "not_div16", "one", "int64", "constexpr", "warps"])
def test_a_different_specialisation_compiles_again(fast, change):
    k, f = fast
    buf = torch.empty(64)
    f[(1,)](buf, 4096, 0.5, BLOCK=128, num_warps=4)
    x, n, kw = buf, 4096, {"BLOCK": 128, "num_warps": 4}
    if change == "misaligned":
        x = buf[1:]  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        x = buf.view(torch.int32)
    elif change == "not_div16":
        n = 4097
    elif change == "one":
        n = 1
    elif change == "int64":
        n = 1 << 33
    elif change == "constexpr":
        kw = {"BLOCK": 64, "num_warps": 4}
    else:
        kw = {"BLOCK": 128, "num_warps": 8}
    f[(1,)](x, n, 0.5, **kw)
    assert k.compiles == 2 and k.log[-1][0] == "jit"
    f[(1,)](x, n, 0.5, **kw)  # and that one is cached in turn
    assert k.compiles == 2 and k.log[-1][0] == "run"


def test_hooks_unknown_args_and_off_switch_take_tritons_path(fast, monkeypatch):
    k, f = fast
    x = torch.empty(64)
    f[(1,)](x, 16, 0.5, BLOCK=128)
    monkeypatch.setattr(launch, "_hooks", lambda: (print, None))  # a profiler's launch hook is installed
    f[(1,)](x, 16, 0.5, BLOCK=128)
    chain = SimpleNamespace(calls=[])  # triton >= 3.4 keeps hooks in a HookChain: an empty one is no hook
    monkeypatch.setattr(launch, "_hooks", lambda: (chain, chain))
    f[(1,)](x, 16, 0.5, BLOCK=128)
    assert k.log[-1][0] == "run"
    chain.calls.append(print)  # a profiler added itself to the chain
    f[(1,)](x, 16, 0.5, BLOCK=128)
    assert k.log[-1][0] == "jit"
    monkeypatch.setattr(launch, "_hooks", lambda: (None, None))
    f[(1,)](x, 16, "not a scalar Triton knows", BLOCK=128)
    monkeypatch.setattr(SETTINGS, "fast_launch", False)
    f[(1,)](x, 16, 0.5, BLOCK=128)
    assert k.compiles == 5 and [e[0] for e in k.log] == ["jit", "jit", "run", "jit", "jit", "jit"]


def test_kernel_without_params_is_never_cached(monkeypatch):
    monkeypatch.setattr(SETTINGS, "fast_launch", True)
    calls = []

    class Interpreted:  # like triton's InterpretedFunction: no `params`, returns nothing
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append(a)

    f = launch.Fast(Interpreted())
    for _ in range(3):
        f[(1,)](torch.empty(4), 3)
    assert len(calls) == 3 and f.cache == {}
