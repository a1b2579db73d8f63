"""FM-Delta tensor codec: a fine-tuned float tensor as (sign, msb) symbols + raw low bits against its base tensor.

Symbols are rANS-coded (kernels/ans.py) per segment of `segment` elements with a quasi-static table of that segment,
so decoding streams and parallelises; raw bits are packed per block (fmdelta_ref.py describes the bit layout).
`context=True` shifts each symbol's msb by the base value's exponent field modulo W: Adam moves a weight by about lr
whatever its size, so msb(|delta|) in integer space is ~ const - exponent(base), and the shift folds all exponents'
distributions onto one peak (methods.md headroom) with the same alphabet and no extra tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from framework.compression import fmdelta_native, fmdelta_ref

BLOCK = 1 << 16  # elements per raw-bit block (word-aligned start)
SEGMENT = 1 << 22  # elements per entropy-coded segment (a multiple of BLOCK)
PROB_BITS = 12


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


def _as_u8(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().cpu().view(torch.uint8).numpy()


def encode_delta(base: torch.Tensor, ft: torch.Tensor, *, context: bool = True, block: int = BLOCK,
                 segment: int = SEGMENT) -> tuple[dict, list[bytes]]:
    """(meta, payload parts) coding `ft` against `base` (same dtype and shape; CPU or CUDA, where they live)."""
    from kernels.ans import ans_encode, quantize_frequencies

    if not delta_codable(base, ft):
        raise ValueError(f"cannot delta-code {ft.dtype} {tuple(ft.shape)} against {base.dtype} {tuple(base.shape)}")
    if segment % block:
        raise ValueError(f"segment={segment} must be a multiple of block={block}")
    fmt = FORMATS[ft.dtype]
    mask = fmt.exp_mask if context else 0
    b, f = _bits(base, fmt), _bits(ft.to(base.device), fmt)
    codec = fmdelta_native if _use_native(b) else fmdelta_ref
    segs, parts = [], []
    for a in range(0, max(b.numel(), 1), segment):
        bs, fs = b[a:a + segment], f[a:a + segment]
        freqs = None
        if codec is fmdelta_native:  # the histogram comes out of the same pass: no second scan of the symbols
            counts = torch.zeros(256, dtype=torch.int64)
            sym, block_words, words = codec.encode(bs, fs, fmt.exp_shift, mask, block, counts)
            if sym.numel():
                freqs = quantize_frequencies(counts[: int(torch.nonzero(counts)[-1]) + 1], PROB_BITS)
        else:
            sym, block_words, words = codec.encode(bs, fs, fmt.exp_shift, mask, block)
        ans = ans_encode(sym, freqs, prob_bits=PROB_BITS).to_bytes()
        bw = _as_u8(block_words.to(torch.int32)).tobytes()
        wb = _as_u8(words).tobytes()
        segs.append([bs.numel(), len(ans), len(bw), len(wb)])
        parts += [ans, bw, wb]
    meta = {"codec": "fmdelta", "context": bool(context), "block": block, "segment": segment, "segments": segs}
    return meta, parts


def _segment_views(meta: dict, payload: memoryview, n_total: int) -> list[tuple[int, memoryview, memoryview, memoryview]]:
    """Split a payload by the segment table, validating every length against the tensor size."""
    out, pos, count = [], 0, 0
    for seg in meta["segments"]:
        if len(seg) != 4 or min(seg) < 0:
            raise ValueError(f"corrupt FM-Delta segment table entry {seg}")
        n, la, lb, lw = (int(x) for x in seg)
        if pos + la + lb + lw > len(payload):
            raise ValueError("FM-Delta payload shorter than its segment table says (truncated)")
        out.append((n, payload[pos:pos + la], payload[pos + la:pos + la + lb], payload[pos + la + lb:pos + la + lb + lw]))
        pos += la + lb + lw
        count += n
    if count != n_total or pos != len(payload):
        raise ValueError(f"FM-Delta segment table covers {count} elements / {pos} bytes, expected {n_total} / "
                         f"{len(payload)}")
    return out


def decode_delta(base: torch.Tensor, meta: dict, payload: bytes | memoryview) -> torch.Tensor:
    """Fine-tuned tensor (base's dtype, shape and device) from its base and `encode_delta` output."""
    from kernels.ans import ANSEncoded, ans_decode

    fmt = FORMATS.get(base.dtype)
    if fmt is None:
        raise ValueError(f"FM-Delta cannot decode against a base of dtype {base.dtype}")
    block, mask = int(meta["block"]), fmt.exp_mask if meta["context"] else 0
    b = _bits(base, fmt)
    out = torch.empty_like(b)
    codec = fmdelta_native if _use_native(b) else fmdelta_ref
    max_words = (block * fmt.width + 63) // 64
    a = 0
    for n, ans, bw, wb in _segment_views(meta, memoryview(payload), b.numel()):
        sym = ans_decode(ANSEncoded.from_bytes(ans), device=b.device)
        if sym.numel() != n:
            raise ValueError(f"FM-Delta symbol stream holds {sym.numel()} symbols, expected {n}")
        nblocks = (n + block - 1) // block
        if len(bw) != 4 * nblocks or len(wb) % 8:
            raise ValueError("corrupt FM-Delta payload: block table or raw-bit stream has the wrong size")
        block_words = torch.from_numpy(np.frombuffer(bw, "<i4").astype(np.int64))
        if bool(((block_words < 0) | (block_words > max_words)).any()) or int(block_words.sum()) != len(wb) // 8:
            raise ValueError("corrupt FM-Delta payload: block table does not match the raw-bit stream")
        if codec is fmdelta_native:  # read the raw bits in place and decode straight into the output slice
            raw = np.frombuffer(wb, np.uint8)
            codec.decode(b[a:a + n], sym, block_words, raw, fmt.exp_shift, mask, block, out=out[a:a + n])
        else:
            dev = b.device
            words = torch.from_numpy(np.frombuffer(wb, "<i8").copy()).to(dev)
            out[a:a + n] = codec.decode(b[a:a + n], sym, block_words.to(dev), words, fmt.exp_shift, mask, block)
        a += n
    return out.view(base.dtype).view(base.shape)


def payload_stats(meta: dict) -> dict[str, int]:
    """Bytes spent on entropy-coded symbols vs raw low bits (for `stats`)."""
    segs = meta.get("segments", [])
    return {"symbol_bytes": sum(s[1] for s in segs), "raw_bytes": sum(s[2] + s[3] for s in segs)}


