"""FM-Delta tensor codec: a fine-tuned float tensor as (sign, msb) symbols + raw low bits against its base tensor.

Symbols are rANS-coded (kernels/ans/__init__.py) per segment of `segment` elements with a quasi-static table of that segment,
so decoding streams and parallelises; raw bits are packed per block (reference.py describes the bit layout).
`context=True` shifts each symbol's msb by the base value's exponent field modulo W: Adam moves a weight by about lr
whatever its size, so msb(|delta|) in integer space is ~ const - exponent(base), and the shift folds all exponents'
distributions onto one peak (methods.md headroom) with the same alphabet and no extra tables.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from memfit.kernels.fmdelta import native as fmdelta_native
from memfit.kernels.fmdelta import reference as fmdelta_ref

BLOCK = 1 << 16  # elements per raw-bit block (word-aligned start)
SEGMENT = 1 << 22  # elements per entropy-coded segment (a multiple of BLOCK)
PROB_BITS = 12
MAX_BLOCK = 1 << 26  # largest block a decoder accepts (block_words must fit 32 bits)
GPU_SEGMENT = 1 << 26  # elements per segment on CUDA: bounds the int64 temporaries (~3 GB) of the torch path
GPU_SYMBOLS_PER_LANE = 512  # rANS lanes on CUDA: faster than 128 on an H200 and a better ratio (fmdelta_speed.py --spl)


@dataclass(frozen=True)
class FloatFormat:
    """Bit layout of a float dtype: integer view and where its exponent field lies."""

    name: str
    int_dtype: torch.dtype
    exp_shift: int
    exp_mask: int

    @property
    def width(self) -> int:
        return torch.iinfo(self.int_dtype).bits


FORMATS: dict[torch.dtype, FloatFormat] = {
    torch.float32: FloatFormat("float32", torch.int32, 23, 0xFF),
    torch.float16: FloatFormat("float16", torch.int16, 10, 0x1F),
    torch.bfloat16: FloatFormat("bfloat16", torch.int16, 7, 0xFF),
    torch.float64: FloatFormat("float64", torch.int64, 52, 0x7FF),
}


def delta_codable(base: torch.Tensor | None, ft: torch.Tensor) -> bool:
    """True when `ft` can be coded against `base`: same float dtype (one of FORMATS) and same shape."""
    return base is not None and ft.dtype in FORMATS and base.dtype == ft.dtype and base.shape == ft.shape


def _bits(t: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(fmt.int_dtype)


def _use_native(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and fmdelta_native.library() is not None


def _use_gpu_kernels(t: torch.Tensor, block: int) -> bool:
    if not t.is_cuda:  # CPU paths never import the Triton module
        return False
    from memfit.kernels.fmdelta import gpu as fmdelta_gpu

    return block % fmdelta_gpu.CHUNK == 0


def _gpu_decode():
    from memfit.kernels.fmdelta import gpu as fmdelta_gpu

    return fmdelta_gpu.decode


def _symbolise(bs: torch.Tensor, fs: torch.Tensor, fmt: FloatFormat, mask: int, block: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(symbols, block_words, raw-bit words, symbol histogram or None) of one segment, by the fastest codec for
    where the tensors live: native C++ (CPU), Triton (CUDA) or the torch reference; all give the same bytes."""
    if _use_native(bs):
        counts = torch.zeros(256, dtype=torch.int64)
        return (*fmdelta_native.encode(bs, fs, fmt.exp_shift, mask, block, counts), counts)
    if _use_gpu_kernels(bs, block):
        from memfit.kernels.fmdelta import gpu as fmdelta_gpu

        sym, block_words, words, counts = fmdelta_gpu.encode(bs, fs, fmt.exp_shift, mask, block)
        return sym, block_words, words, counts.cpu()
    return (*fmdelta_ref.encode(bs, fs, fmt.exp_shift, mask, block), None)


def _words_on(buf: memoryview, device: torch.device) -> torch.Tensor:
    """The raw-bit words (int64) of a payload slice on `device`; to CUDA straight from the payload, no host copy."""
    if device.type != "cuda" or not len(buf):
        return torch.from_numpy(np.frombuffer(buf, "<i8").copy()).to(device)
    with warnings.catch_warnings():  # read-only payload: the view is only read, by the copy to the device
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=torch.int64).to(device)


def _as_u8(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().cpu().view(torch.uint8).numpy()


def encode_delta(base: torch.Tensor, ft: torch.Tensor, *, context: bool = True, block: int = BLOCK,
                 segment: int | None = None, symbols_per_lane: int | None = None) -> tuple[dict, list[bytes]]:
    """(meta, payload parts) coding `ft` against `base` (same dtype and shape; CPU or CUDA, where they live).

    Defaults depend on the device: on CPU, segments of SEGMENT elements (bounded decode memory, thread-parallel) and
    the coder's default lanes; on CUDA one segment per tensor (up to GPU_SEGMENT) and GPU_SYMBOLS_PER_LANE, because
    a GPU needs ~10^5 independent rANS lanes to hide its latency (per-lane cost: ~6 bytes, <0.2 bits per symbol)."""
    from memfit.kernels.ans import ans_encode, default_lanes, quantize_frequencies

    if not delta_codable(base, ft):
        raise ValueError(f"cannot delta-code {ft.dtype} {tuple(ft.shape)} against {base.dtype} {tuple(base.shape)}")
    cuda = base.device.type == "cuda"
    if segment is None:
        segment = min(GPU_SEGMENT, max(SEGMENT, -(-base.numel() // block) * block)) if cuda else SEGMENT
    if symbols_per_lane is None and cuda:
        symbols_per_lane = GPU_SYMBOLS_PER_LANE
    if segment % block:
        raise ValueError(f"segment={segment} must be a multiple of block={block}")
    fmt = FORMATS[ft.dtype]
    mask = fmt.exp_mask if context else 0
    b, f = _bits(base, fmt), _bits(ft.to(base.device), fmt)
    segs, parts = [], []
    for a in range(0, max(b.numel(), 1), segment):
        bs, fs = b[a:a + segment], f[a:a + segment]
        sym, block_words, words, counts = _symbolise(bs, fs, fmt, mask, block)
        freqs = None  # when the codec gave no histogram, ans_encode takes one
        if counts is not None and sym.numel():
            freqs = quantize_frequencies(counts[: int(torch.nonzero(counts)[-1]) + 1], PROB_BITS)
        lanes = None if symbols_per_lane is None else default_lanes(sym.numel(), symbols_per_lane)
        ans = ans_encode(sym, freqs, lanes=lanes, prob_bits=PROB_BITS).to_bytes()
        bw = _as_u8(block_words.to(torch.int32)).tobytes()
        # a CUDA tensor's .cpu() is already a private copy: hand out a view of it (no second copy of the raw bits)
        wb = memoryview(_as_u8(words)) if words.is_cuda else _as_u8(words).tobytes()
        segs.append([bs.numel(), len(ans), len(bw), len(wb)])
        parts += [ans, bw, wb]
    meta = {"codec": "fmdelta", "context": bool(context), "block": block, "segment": segment, "segments": segs}
    return meta, parts


def _segment_views(meta: dict, payload: memoryview, n_total: int) -> list[tuple[int, memoryview, memoryview, memoryview]]:
    """Split a payload by the segment table, validating every entry and length against the tensor size."""
    segments = meta.get("segments")
    if not isinstance(segments, list):
        raise ValueError("corrupt FM-Delta meta: no segment table")
    out, pos, count = [], 0, 0
    for seg in segments:
        if not isinstance(seg, list) or len(seg) != 4 or not all(type(x) is int and x >= 0 for x in seg):
            raise ValueError(f"corrupt FM-Delta segment table entry {str(seg)[:80]}")
        n, la, lb, lw = seg
        if pos + la + lb + lw > len(payload) or count + n > n_total:
            raise ValueError("FM-Delta payload or tensor shorter than its segment table says (truncated)")
        out.append((n, payload[pos:pos + la], payload[pos + la:pos + la + lb], payload[pos + la + lb:pos + la + lb + lw]))
        pos += la + lb + lw
        count += n
    if count != n_total or pos != len(payload):
        raise ValueError(f"FM-Delta segment table covers {count} elements / {pos} bytes, expected {n_total} / "
                         f"{len(payload)}")
    return out


def _check_codec_meta(meta: dict) -> tuple[int, bool]:
    """(block, context) of a delta record's meta, validated (it comes from a file)."""
    block, context = meta.get("block"), meta.get("context")
    if type(block) is not int or not 1 <= block <= MAX_BLOCK or type(context) is not bool:
        raise ValueError(f"corrupt FM-Delta meta: block={str(block)[:20]} context={str(context)[:20]}")
    return block, context


def decode_delta(base: torch.Tensor, meta: dict, payload: bytes | memoryview) -> torch.Tensor:
    """Fine-tuned tensor (base's dtype, shape and device) from its base and `encode_delta` output."""
    from memfit.kernels.ans import ANSEncoded, ans_decode

    fmt = FORMATS.get(base.dtype)
    if fmt is None:
        raise ValueError(f"FM-Delta cannot decode against a base of dtype {base.dtype}")
    block, context = _check_codec_meta(meta)
    mask = fmt.exp_mask if context else 0
    b = _bits(base, fmt)
    out = torch.empty_like(b)
    native, gpu = _use_native(b), _use_gpu_kernels(b, block)
    max_words = (block * fmt.width + 63) // 64
    a = 0
    for n, ans, bw, wb in _segment_views(meta, memoryview(payload), b.numel()):
        enc = ANSEncoded.from_bytes(ans)
        if enc.n != n:  # checked before decoding: a crafted count must not size an allocation
            raise ValueError(f"FM-Delta symbol stream holds {enc.n} symbols, expected {n}")
        sym = ans_decode(enc, device=b.device)
        nblocks = (n + block - 1) // block
        if len(bw) != 4 * nblocks or len(wb) % 8:
            raise ValueError("corrupt FM-Delta payload: block table or raw-bit stream has the wrong size")
        block_words = torch.from_numpy(np.frombuffer(bw, "<i4").astype(np.int64))
        if bool(((block_words < 0) | (block_words > max_words)).any()) or int(block_words.sum()) != len(wb) // 8:
            raise ValueError("corrupt FM-Delta payload: block table does not match the raw-bit stream")
        if native:  # read the raw bits in place and decode straight into the output slice
            raw = np.frombuffer(wb, np.uint8)
            fmdelta_native.decode(b[a:a + n], sym, block_words, raw, fmt.exp_shift, mask, block, out=out[a:a + n])
        elif gpu:  # straight into the output slice (no temporary tensor, no extra device copy)
            dev = b.device
            _gpu_decode()(b[a:a + n], sym, block_words.to(dev), _words_on(wb, dev), fmt.exp_shift, mask, block,
                          out=out[a:a + n])
        else:
            out[a:a + n] = fmdelta_ref.decode(b[a:a + n], sym, block_words, _words_on(wb, b.device), fmt.exp_shift,
                                              mask, block)
        a += n
    return out.view(base.dtype).view(base.shape)


def payload_stats(meta: dict, payload: bytes | memoryview, numel: int) -> dict[str, int]:
    """Bytes spent on entropy-coded symbols vs raw low bits (for `stats`), from a validated segment table."""
    segs = _segment_views(meta, memoryview(payload), numel)
    return {"symbol_bytes": sum(len(a) for _, a, _, _ in segs),
            "raw_bytes": sum(len(b) + len(w) for _, _, b, w in segs)}
