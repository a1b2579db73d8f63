"""Low-overhead repeat launches of a @triton.jit kernel.

`kernel[grid](...)` runs Triton's JITFunction.run on every call: it binds and specialises every argument and hashes a
cache key, ~10-20 us of host time per launch, more than a one-token NF4 GEMV takes on the GPU (and a batch-1
generation step makes a few hundred such launches). `Fast(kernel)[grid](...)` takes that path once per
specialisation and keeps the compiled kernel; later calls with the same specialisation call it directly.

The specialisation key is built conservatively from what Triton specialises on (triton >= 3.3): each tensor's dtype
and whether its address is 16-byte aligned; each int's 32/64-bit range, whether it is 1 and whether it is a multiple
of 16; the type of any other scalar; the values of all keyword arguments (constexprs, num_warps, ...) and the device.
An argument of any other kind, a launch hook (profilers) or `MEMFIT_FAST_LAUNCH=0` sends every call down Triton's
own path. On by default only where the GPU tests compared both paths (`ENABLED`).

Plain Python (no Triton code), so kernel files loaded under the interpreter can import it too; under the
interpreter Triton returns no compiled kernel, so every call takes the ordinary path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from memfit.kernels.settings import SETTINGS


def _spec(args: Sequence[Any]) -> tuple | None:
    """What Triton's binder specialises on, per positional argument; None for an argument kind not handled here."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() & 15 == 0))
        elif type(a) is int:
            out.append((a == 1, a & 15 == 0, -(1 << 31) <= a < 1 << 31, a < 1 << 63))
        elif type(a) in (float, bool) or a is None:
            out.append(type(a))
        else:
            return None
    return tuple(out)


@functools.cache
def _runtime() -> tuple[Any, Any]:
    """(triton's driver, its `knobs` module or None), imported once: this module sits on the launch path."""
    from triton.runtime import driver

    try:
        from triton import knobs
    except ImportError:
        knobs = None
    return driver, knobs


def _device_and_stream() -> tuple[int, int]:
    driver = _runtime()[0]
    device = driver.active.get_current_device()
    return device, driver.active.get_current_stream(device)


def _hooks() -> tuple[Any, Any] | None:
    """Triton's launch enter/exit hooks, or None where this triton has no `knobs` (then: never fast)."""
    knobs = _runtime()[1]
    if knobs is None:
        return None
    return knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook


def _active(hook: Any) -> bool:
    """Whether a launch hook would do anything: None (older triton) or an empty HookChain (triton >= 3.4) would not."""
    return hook is not None and bool(getattr(hook, "calls", True))


class Fast:
    """`Fast(kernel)[grid](*args, **kwargs)`: the same launch as `kernel[grid](*args, **kwargs)`."""

    def __init__(self, kernel: Any):
        self.kernel = kernel
        self.cache: dict[tuple, Any] = {}
        try:  # JITFunction.params; another triton (or kernel kind) without them just never takes the fast path
            params = list(kernel.params)
            self.names: list[str] | None = [p.name for p in params]
            self.defaults = {p.name: p._param.default for p in params}
        except (AttributeError, TypeError):
            self.names, self.defaults = None, {}

    def __getitem__(self, grid: Sequence[int]) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: Sequence[int], args: tuple, kwargs: dict[str, Any]) -> None:
        hooks = _hooks() if SETTINGS.fast_launch and self.names is not None else None
        spec = _spec(args) if hooks is not None and not any(map(_active, hooks)) else None
        if spec is None:
            self.kernel[grid](*args, **kwargs)
            return
        device, stream = _device_and_stream()
        key = (device, spec, tuple(kwargs.items()))
        compiled = self.cache.get(key)
        if compiled is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if compiled is not None and hasattr(compiled, "run"):  # None under the interpreter
                self.cache[key] = compiled
            return
        rest = [kwargs[n] if n in kwargs else self.defaults[n] for n in self.names[len(args):]]
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None, *args,
                     *rest)
