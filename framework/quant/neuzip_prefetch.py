"""F.linear on a NeuZipTensor weight, with the next layer's decode hidden behind this layer's matmul on CUDA.

Why: decoding is memory/latency bound and a matmul is compute bound, so they can share the GPU. The prefetcher learns
the order in which NeuZip weights are used in forward (and, separately, in backward) by watching consecutive calls;
when weight A is used and B followed A last time, B is decoded on a side stream while A's matmul runs, into a buffer
allocated on the compute stream (so the caching allocator's stream bookkeeping stays exact), and the compute stream
waits on an event before using it: no host sync. At most one prefetched weight is pending, so at most two dense
weights are alive at once. A stale entry (the compressed form changed: `_Store.version`) is never used.
Autograd saves only the NeuZipTensor (the compressed form); the dense weight is freed after each use.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

from memfit.kernels.settings import SETTINGS
from memfit.quant.neuzip import NeuZipTensor, _Store, decode_store

# Off by default: on an H200 (experiments/results/neuzip_speed.md, Llama-3-8B MLP block, 4096 tokens) the side-stream
# decode competes with the matmul for SMs and the block took 1.56x dense with it vs 1.40x without. Set
# MEMFIT_NEUZIP_PREFETCH=1 (or this flag) to try it on other shapes.


class Prefetcher:
    """Learned next-weight links per direction and at most one pending side-stream decode."""

    def __init__(self) -> None:
        self.next: dict[str, weakref.WeakKeyDictionary] = {"fwd": weakref.WeakKeyDictionary(),
                                                            "bwd": weakref.WeakKeyDictionary()}
        self.prev: dict[str, Any] = {"fwd": None, "bwd": None}
        self.pending: tuple[Any, int, torch.Tensor, torch.cuda.Event, Any] | None = None
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.hits = 0

    def reset(self) -> None:
        self.__init__()

    def _drop(self) -> None:
        if self.pending is not None:
            _, _, _, done, _ = self.pending
            torch.cuda.current_stream().wait_event(done)  # the side stream may still write the buffer
            self.pending = None

    def get(self, w: NeuZipTensor, direction: str) -> torch.Tensor:
        """w's dense weight (prefetched if it was), after scheduling the decode of the weight expected next."""
        s = w._s
        other = "bwd" if direction == "fwd" else "fwd"
        self.prev[other] = None  # a direction change ends the other direction's chain
        prev = self.prev[direction]
        if prev is not None and prev() is not None and prev() is not s:
            self.next[direction][prev()] = (weakref.ref(s), w.shape, w.dtype)
        self.prev[direction] = weakref.ref(s)
        dense = None
        if self.pending is not None and self.pending[0]() is s and self.pending[1] == s.version:
            _, _, dense, done, _ = self.pending
            torch.cuda.current_stream().wait_event(done)
            self.pending = None
            self.hits += 1
        else:
            self._drop()
        nxt = self.next[direction].get(s)
        if nxt is not None and nxt[0]() is not None and nxt[0]() is not s:
            self._schedule(nxt[0](), nxt[1], nxt[2])
        if dense is None:
            dense = decode_store(s, w.dtype, w.numel()).view(w.shape)
        return dense

    def _schedule(self, s: _Store, shape: torch.Size, dtype: torch.dtype) -> None:
        dev = s.packed.device
        main = torch.cuda.current_stream(dev)
        side = self.streams.setdefault(dev, torch.cuda.Stream(dev))
        buf = torch.empty(shape, dtype=dtype, device=dev)  # allocated on the compute stream, which uses and frees it
        side.wait_stream(main)
        with torch.cuda.stream(side):
            res = decode_store(s, dtype, buf.numel(), out=buf)
        done = torch.cuda.Event()
        done.record(side)
        self.pending = (weakref.ref(s), s.version, res.view(shape), done, None)


PREFETCH = Prefetcher()


def _dense(w: NeuZipTensor, direction: str) -> torch.Tensor:
    if SETTINGS.neuzip_prefetch and w.device.type == "cuda":
        return PREFETCH.get(w, direction)
    return w.dequantize()


class _NeuZipLinear(torch.autograd.Function):
    """y = x W^T + b with W decoded in forward and again in backward; gradients flow to x and b only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: NeuZipTensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.w = w  # the compressed form only
        ctx.has_bias = bias is not None
        with torch._C.DisableTorchFunctionSubclass():
            return F.linear(x, _dense(w, "fwd").to(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        gx = grad @ _dense(ctx.w, "bwd").to(grad.dtype) if ctx.needs_input_grad[0] else None
        gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, None, gb


def neuzip_linear(x: torch.Tensor, w: NeuZipTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a NeuZip weight; honours autocast (computes in the autocast dtype when it is on). A weight trained
    compressed (`w._s.trainer`, framework/quant/neuzip_train.py) is updated inside its backward."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
        bias = None if bias is None else bias.to(x.dtype)
    if w._s.trainer is not None and torch.is_grad_enabled():
        return w._s.trainer.linear(x, w, bias)  # trained compressed: updated inside backward (neuzip_train)
    return _NeuZipLinear.apply(x, w, bias)


NeuZipTensor.linear_impl = staticmethod(neuzip_linear)
