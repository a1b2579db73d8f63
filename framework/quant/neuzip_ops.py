"""aten-level ops on `NeuZipTensor` (registered in its op table (memfit.quant.subclass)).

Metadata ops (detach, alias, view, reshape, contiguous as_strided) return a new wrapper over the SAME `_Store`, so an
in-place `copy_` into any view is seen by all of them (FSDP2 copies the shard into a `new_zeros` tensor and keeps a
`view(-1)` of it). A dim-0 `split`/`slice` cannot cut an entropy-coded stream, so it decodes the exponent symbols and
sign/mantissa fields (exact, no float arithmetic), slices them and re-encodes each part; every part learns the largest
word count (`fsdp_pad_to`) so that all ranks' all-gather inputs have one size (all ranks compute identical bytes).
Anything else runs on the dequantized tensor (correct, but materialises a dense copy).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from memfit.kernels.ans import ans_decode, ans_encode
from memfit.quant import neuzip_codec as codec
from memfit.quant.neuzip import NeuZipTensor, _Store

aten = torch.ops.aten


def _alias(t: NeuZipTensor, shape: torch.Size | None = None) -> NeuZipTensor:
    return NeuZipTensor._wrap(t._s, t.shape if shape is None else torch.Size(shape), t.dtype)


@NeuZipTensor.implements(aten.detach.default, aten.alias.default)
def _detach(func: Any, t: NeuZipTensor) -> NeuZipTensor:
    return _alias(t)


@NeuZipTensor.implements(aten.clone.default)
def _clone(func: Any, t: NeuZipTensor, memory_format: Any = None) -> NeuZipTensor:
    return NeuZipTensor._wrap(replace(t._s, version=0), t.shape, t.dtype)  # inner tensors are never mutated in place


@NeuZipTensor.implements(aten._to_copy.default)
def _to_copy(func: Any, t: NeuZipTensor, dtype: torch.dtype | None = None, device: Any = None,
             non_blocking: bool = False, **kwargs: Any) -> torch.Tensor:
    """`.to(device)` moves the compressed form. A change to another dtype NeuZip stores (bf16/fp16/fp32) gives a
    NeuZipTensor re-compressed in it (lossless stays lossless; lossy keeps its mantissa bits, capped at the new
    dtype's), so `module.to(dtype)` (Lightning's bf16-true precision) swaps in a correct weight: a dense result went
    in through `param.data =`, which left this object's fp32 stream under the new dtype, decoded as garbage. Any
    other dtype (float64) yields a dense tensor of that dtype."""
    if dtype is not None and dtype != t.dtype:
        dense = t.dequantize().to(dtype=dtype, device=device)
        if dtype not in codec.FORMATS:
            return dense
        s = t._s
        lossless = s.mantissa_bits >= codec.float_format(t.dtype).man_bits
        k = None if lossless else min(s.mantissa_bits, codec.float_format(dtype).man_bits)
        out = NeuZipTensor.from_dense(dense, k, block=s.block, symbols_per_lane=s.spl)
        out._s.trainer, out._s.name = s.trainer, s.name
        return out
    return t._to(device if device is not None else t.device)


@NeuZipTensor.implements(aten.is_pinned.default)
def _is_pinned(func: Any, t: NeuZipTensor, device: Any = None) -> bool:
    return t.packed.is_pinned()


@NeuZipTensor.implements(aten._pin_memory.default)
def _pin(func: Any, t: NeuZipTensor, device: Any = None) -> NeuZipTensor:
    s = t._s
    e = s.enc
    enc = type(e)(e.words.pin_memory(), e.lane_offsets.pin_memory(), e.final_states.pin_memory(),
                  e.freqs.pin_memory(), e.n, e.lanes, e.prob_bits)
    sc = None if s.scales is None else s.scales.pin_memory()
    return NeuZipTensor._wrap(replace(s, enc=enc, packed=s.packed.pin_memory(), scales=sc, version=0), t.shape, t.dtype)


@NeuZipTensor.implements(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(func: Any, t: NeuZipTensor, size: list[int]) -> NeuZipTensor:
    """The compressed stream is in flat element order, so any same-numel view is metadata only."""
    return _alias(t, torch.empty(t.shape, device="meta").view(size).shape)


@NeuZipTensor.implements(aten.as_strided.default)
def _as_strided(func: Any, t: NeuZipTensor, size: list[int], stride: list[int],
                storage_offset: int | None = 0) -> NeuZipTensor:
    shape = torch.Size(size)
    if shape.numel() != t.numel() or tuple(stride) != torch.empty(shape, device="meta").stride() or storage_offset:
        raise NotImplementedError(f"NeuZipTensor supports only contiguous full-size as_strided views, got size="
                                  f"{list(size)} stride={list(stride)} offset={storage_offset} on {tuple(t.shape)}")
    return _alias(t, shape)


# ------------------------------------------------------------------------------------------------ dim-0 sharding
def _fields(t: NeuZipTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exponent symbols uint8 (n,), sign<<k | mantissa int32 (n,)) of the whole tensor, decoded exactly."""
    s = t._s
    return ans_decode(s.enc, validate=True), codec.unpack_bits(s.packed, 1 + s.mantissa_bits, t.numel())


def _parts(t: NeuZipTensor, bounds: list[tuple[int, int]]) -> list[NeuZipTensor]:
    """Independent NeuZipTensors holding rows [a, b) of `t`, re-encoded; all share the largest word count as
    `fsdp_pad_to`."""
    s = t._s
    row = t.numel() // max(1, t.shape[0])
    exps, signman = _fields(t)
    out = []
    for a, b in bounds:
        e0, e1 = a * row, b * row
        if s.scales is not None and (e0 % s.block or (e1 % s.block and e1 != t.numel())):
            raise NotImplementedError(f"cannot split a block-normalised NeuZipTensor of shape {tuple(t.shape)} at rows "
                                      f"[{a}, {b}): shard boundaries must fall on multiples of block={s.block}")
        enc = ans_encode(exps[e0:e1].contiguous(), lanes=max(1, -(-(e1 - e0) // s.spl)), prob_bits=s.enc.prob_bits)
        sc = None if s.scales is None else s.scales[e0 // s.block: -(-e1 // s.block)].clone()
        packed = codec.pack_bits(signman[e0:e1], 1 + s.mantissa_bits)
        store = _Store(enc, packed, sc, s.mantissa_bits, s.block, spl=s.spl)
        out.append(NeuZipTensor._wrap(store, torch.Size([b - a, *t.shape[1:]]), t.dtype))
    pad = max(p.enc.words.numel() for p in out)
    for p in out:
        p.fsdp_pad_to = pad
    return out


@NeuZipTensor.implements(aten.split.Tensor)
def _split(func: Any, t: NeuZipTensor, split_size: int, dim: int = 0) -> list[NeuZipTensor]:
    if dim != 0:
        raise NotImplementedError(f"NeuZipTensor can only be split along dim 0 (got dim={dim})")
    rows = t.shape[0]
    if split_size >= rows:
        return [_alias(t)]
    return _parts(t, [(a, min(rows, a + split_size)) for a in range(0, rows, split_size)])


@NeuZipTensor.implements(aten.slice.Tensor)
def _slice(func: Any, t: NeuZipTensor, dim: int = 0, start: int | None = None, end: int | None = None,
           step: int = 1) -> NeuZipTensor:
    """The full range is a view (shares the store); a proper row range is an independent re-encoded copy."""
    if dim != 0 or step != 1:
        raise NotImplementedError(f"NeuZipTensor supports slicing along dim 0 with step 1 only (dim={dim}, step={step})")
    rows = t.shape[0]
    start = 0 if start is None else max(0, min(rows, start + rows if start < 0 else start))
    end = rows if end is None else max(start, min(rows, end + rows if end < 0 else end))
    if (start, end) == (0, rows):
        return _alias(t)
    (part,) = _parts(t, [(start, end)])
    part.fsdp_pad_to = None
    return part


@NeuZipTensor.implements(aten.new_zeros.default)
def _new_zeros(func: Any, t: NeuZipTensor, size: list[int], dtype: torch.dtype | None = None, layout: Any = None,
               device: Any = None, pin_memory: bool | None = None) -> torch.Tensor:
    """An all-zero NeuZipTensor with t's settings (FSDP2 allocates the padded shard this way)."""
    z = torch.zeros(size, dtype=t.dtype, device=device or t.device)
    if dtype is not None and dtype != t.dtype:
        return z.to(dtype)
    out = NeuZipTensor.from_dense(z, t.mantissa_bits, block=t.block, symbols_per_lane=t._s.spl)
    return out


@NeuZipTensor.implements(aten.copy_.default)
def _copy(func: Any, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """NeuZip <- NeuZip adopts the compressed form (seen by every view of dst); NeuZip <- dense compresses with dst's
    settings; dense <- NeuZip decodes."""
    if not isinstance(dst, NeuZipTensor):
        return dst.copy_(src.dequantize(), non_blocking=non_blocking)
    if src.numel() != dst.numel():
        raise ValueError(f"copy_ into NeuZipTensor of shape {tuple(dst.shape)} from {tuple(src.shape)}")
    if not isinstance(src, NeuZipTensor):
        src = NeuZipTensor.from_dense(src.to(dst.dtype).reshape(dst.shape), dst.mantissa_bits, block=dst.block,
                                      symbols_per_lane=dst._s.spl)
    if src.dtype != dst.dtype:
        raise ValueError(f"copy_ between NeuZipTensors of dtypes {src.dtype} and {dst.dtype}")
    new = src._s if src.device == dst.device else src._s.moved(dst.device)
    d = dst._s
    d.enc, d.packed, d.scales = new.enc, new.packed, new.scales
    d.mantissa_bits, d.block, d.spl, d.fsdp_pad_to = new.mantissa_bits, new.block, new.spl, new.fsdp_pad_to
    d.version += 1
    return dst


@NeuZipTensor.implements(aten.equal.default)
def _equal(func: Any, a: torch.Tensor, b: torch.Tensor) -> bool:
    da = a.dequantize() if isinstance(a, NeuZipTensor) else a
    db = b.dequantize() if isinstance(b, NeuZipTensor) else b
    return torch.equal(da, db)


@NeuZipTensor.implements(aten.is_same_size.default)
def _same_size(func: Any, a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape
