"""aten-level ops on `NF4Tensor` (registered in its op table (memfit.quant.subclass)).

Metadata ops (detach, view, as_strided, clone, to/_to_copy, copy_) act on the packed inner tensors, as do the ops FSDP2
uses to shard a parameter along dim 0 (split, slice/narrow, new_zeros, copy_): a dim-0 shard of a flat NF4 tensor is a
contiguous range of elements, hence a contiguous range of packed bytes and absmax blocks, as long as every shard
boundary falls on a block boundary (with double quantization: on a 256-block boundary). Anything else raises a clear
error. Every other op runs on the dequantized tensor (correct, but materialises a dense copy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from memfit.kernels.nf4 import quantize_nf4
from memfit.quant.nf4 import NF4Tensor
from memfit.quant.nf4_double import DQ_BLOCK

aten = torch.ops.aten


def _same(t: NF4Tensor, fn: Callable[[torch.Tensor], torch.Tensor], **kw: Any) -> NF4Tensor:
    return t.with_inner(fn(t.packed), tuple(fn(s) for s in t.scale_tensors()), **kw)


@NF4Tensor.implements(aten.detach.default, aten.alias.default)
def _detach(func: Any, t: NF4Tensor) -> NF4Tensor:
    return _same(t, func)


@NF4Tensor.implements(aten.clone.default)
def _clone(func: Any, t: NF4Tensor, memory_format: Any = None) -> NF4Tensor:
    return _same(t, lambda x: x.clone())


@NF4Tensor.implements(aten._to_copy.default)
def _to_copy(func: Any, t: NF4Tensor, dtype: torch.dtype | None = None, device: Any = None, non_blocking: bool = False,
             **kwargs: Any) -> NF4Tensor:
    """`.to(device)` moves the packed data; `.to(dtype)` changes only the dtype that dequantize produces."""
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"an NF4Tensor can only be cast to a floating-point dtype, not {dtype}")
    move = (lambda x: x.to(device, non_blocking=non_blocking)) if device is not None else (lambda x: x)
    return _same(t, move, dtype=dtype or t.dtype)


@NF4Tensor.implements(aten.is_pinned.default)
def _is_pinned(func: Any, t: NF4Tensor, device: Any = None) -> bool:
    return all(x.is_pinned() for x in t.inner_tensors())


@NF4Tensor.implements(aten._pin_memory.default)
def _pin(func: Any, t: NF4Tensor, device: Any = None) -> NF4Tensor:
    return _same(t, lambda x: x.pin_memory())


@NF4Tensor.implements(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(func: Any, t: NF4Tensor, size: list[int]) -> NF4Tensor:
    """The storage is flat, so any same-numel view of a contiguous NF4Tensor is metadata only."""
    shape = _infer_size(size, t.numel())
    return _same(t, lambda x: x.view(-1), shape=shape)


@NF4Tensor.implements(aten.as_strided.default)
def _as_strided(func: Any, t: NF4Tensor, size: list[int], stride: list[int], storage_offset: int | None = 0) -> NF4Tensor:
    shape = torch.Size(size)
    contiguous = torch.empty(shape, device="meta").stride()
    if shape.numel() != t.numel() or tuple(stride) != contiguous or (storage_offset or 0) != 0:
        raise NotImplementedError(f"NF4Tensor supports only contiguous full-size as_strided views, got size={list(size)} "
                                  f"stride={list(stride)} offset={storage_offset} on {tuple(t.shape)}")
    return _same(t, lambda x: x, shape=shape)


def _infer_size(size: list[int], numel: int) -> torch.Size:
    size = list(size)
    if -1 in size:
        known = math.prod(s for s in size if s != -1)
        size[size.index(-1)] = numel // max(1, known)
    if math.prod(size) != numel:
        raise RuntimeError(f"cannot view an NF4Tensor of {numel} elements as {size}")
    return torch.Size(size)


# ------------------------------------------------------------------------------------------------ dim-0 sharding
def _row_slice(t: NF4Tensor, start: int, end: int) -> NF4Tensor:
    """Rows [start, end) of `t` as an NF4Tensor viewing the same packed buffers."""
    rows = t.shape[0] if t.dim() else 1
    start, end = max(0, min(start, rows)), max(0, min(end, rows))
    end = max(start, end)
    row_numel = math.prod(t.shape[1:])
    e0, e1 = start * row_numel, end * row_numel
    unit = t.block_size * (DQ_BLOCK if t.double_quant else 1)
    n = t.numel()
    if e0 % unit or (e1 % unit and e1 != n):
        raise NotImplementedError(
            f"cannot shard an NF4Tensor of shape {tuple(t.shape)} at rows [{start}, {end}): shard boundaries must fall "
            f"on multiples of {unit} elements (block_size={t.block_size}"
            f"{' x 256 with double_quant' if t.double_quant else ''}); choose a world size that divides the rows so")
    bs = t.block_size
    packed = t.packed[e0 // 2: (e1 + 1) // 2]
    shape = torch.Size([end - start, *t.shape[1:]])
    if not t.double_quant:
        return t.with_inner(packed, (t.absmax[e0 // bs: -(-e1 // bs)],), shape=shape)
    b0, b1 = e0 // bs, -(-e1 // bs)
    return t.with_inner(packed, (t.qabsmax[b0:b1], t.absmax2[b0 // DQ_BLOCK: -(-b1 // DQ_BLOCK)]), shape=shape)


@NF4Tensor.implements(aten.split.Tensor)
def _split(func: Any, t: NF4Tensor, split_size: int, dim: int = 0) -> list[NF4Tensor]:
    if dim != 0:
        raise NotImplementedError(f"NF4Tensor can only be split along dim 0 (got dim={dim})")
    return [_row_slice(t, s, s + split_size) for s in range(0, t.shape[0], split_size)]


@NF4Tensor.implements(aten.slice.Tensor)
def _slice(func: Any, t: NF4Tensor, dim: int = 0, start: int | None = None, end: int | None = None,
           step: int = 1) -> NF4Tensor:
    if dim != 0 or step != 1:
        raise NotImplementedError(f"NF4Tensor supports slicing along dim 0 with step 1 only (dim={dim}, step={step})")
    rows = t.shape[0]
    start = 0 if start is None else (start + rows if start < 0 else start)
    end = rows if end is None else (end + rows if end < 0 else end)
    return _row_slice(t, start, end)


@NF4Tensor.implements(aten.new_zeros.default)
def _new_zeros(func: Any, t: NF4Tensor, size: list[int], dtype: torch.dtype | None = None, layout: Any = None,
               device: Any = None, pin_memory: bool | None = None) -> NF4Tensor:
    """An all-zero NF4Tensor (zero scales) of `size`: FSDP2 allocates padded shards this way."""
    shape = torch.Size(size)
    n = shape.numel()
    dev = device or t.device
    nb = -(-n // t.block_size)
    packed = torch.zeros((n + 1) // 2, dtype=torch.uint8, device=dev)
    if not t.double_quant:
        scales: tuple[torch.Tensor, ...] = (torch.zeros(nb, dtype=torch.float32, device=dev),)
    else:
        scales = (torch.zeros(nb, dtype=torch.uint8, device=dev),
                  torch.zeros(-(-nb // DQ_BLOCK), dtype=torch.float32, device=dev))
    return t.with_inner(packed, scales, shape=shape, dtype=dtype or t.dtype)


@NF4Tensor.implements(aten.copy_.default)
def _copy(func: Any, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """NF4 <- NF4 copies the packed form; NF4 <- dense quantizes (no double quant); dense <- NF4 dequantizes."""
    if not isinstance(dst, NF4Tensor):
        return dst.copy_(src.dequantize(dst.dtype), non_blocking=non_blocking)
    if dst.shape != src.shape:
        raise RuntimeError(f"copy_ into NF4Tensor: shape {tuple(src.shape)} != {tuple(dst.shape)}")
    if not isinstance(src, NF4Tensor):
        if dst.double_quant:
            src = NF4Tensor.from_dense(src, dst.block_size, double_quant=True)
        else:
            packed, absmax = quantize_nf4(src, dst.block_size)
            dst.packed.copy_(packed, non_blocking=non_blocking)
            dst.absmax.copy_(absmax, non_blocking=non_blocking)
            return dst
    if (src.block_size, src.double_quant) != (dst.block_size, dst.double_quant):
        raise RuntimeError(f"copy_ between NF4Tensors with different settings: block_size {src.block_size} vs "
                           f"{dst.block_size}, double_quant {src.double_quant} vs {dst.double_quant}")
    for d, s in zip(dst.inner_tensors(), src.inner_tensors()):
        d.copy_(s, non_blocking=non_blocking)
    dst.offset = src.offset
    return dst


@NF4Tensor.implements(aten.equal.default)
def _equal(func: Any, a: torch.Tensor, b: torch.Tensor) -> bool:
    if isinstance(a, NF4Tensor) and isinstance(b, NF4Tensor) and a.double_quant == b.double_quant:
        return a.shape == b.shape and a.offset == b.offset and all(
            torch.equal(x, y) for x, y in zip(a.inner_tensors(), b.inner_tensors()))
    da = a.dequantize() if isinstance(a, NF4Tensor) else a
    db = b.dequantize() if isinstance(b, NF4Tensor) else b
    return torch.equal(da, db)
