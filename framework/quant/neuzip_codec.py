"""NeuZip bit-level codec: split floats into an exponent symbol stream and packed sign+mantissa bits, and back.

Pure torch functions (CPU or CUDA), no entropy coding here (that is memfit.kernels.ans). Lossless keeps every mantissa bit;
lossy mode keeps the top k bits, rounding the magnitude to nearest (ties away from zero) with the carry flowing into
the exponent, saturating at the largest finite value (a weight never becomes inf); inf stays inf, NaN becomes a quiet
NaN (k >= 1 is needed to represent it). Optional block normalisation divides each block of `block` weights by the
mantissa of its absmax (a value in [1, 2)), so the block's absmax is a power of two and survives rounding exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatFormat:
    """IEEE layout of a supported dtype: integer view dtype, exponent bits, mantissa bits."""

    int_dtype: torch.dtype
    exp_bits: int
    man_bits: int

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits


FORMATS: dict[torch.dtype, FloatFormat] = {
    torch.bfloat16: FloatFormat(torch.int16, 8, 7),
    torch.float16: FloatFormat(torch.int16, 5, 10),
    torch.float32: FloatFormat(torch.int32, 8, 23),
}


def float_format(dtype: torch.dtype) -> FloatFormat:
    if dtype not in FORMATS:
        raise ValueError(f"NeuZip supports {sorted(str(d) for d in FORMATS)}, got {dtype}")
    return FORMATS[dtype]


def check_mantissa_bits(dtype: torch.dtype, k: int | None) -> int:
    """None -> all mantissa bits (lossless); otherwise 0 <= k <= mantissa width."""
    fmt = float_format(dtype)
    if k is None:
        return fmt.man_bits
    if not 0 <= int(k) <= fmt.man_bits:
        raise ValueError(f"mantissa_bits must be in 0..{fmt.man_bits} for {dtype} (or None for lossless), got {k}")
    return int(k)


def block_scales(w: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 per-block mantissa of the absmax (1.0 for all-zero or non-finite blocks)."""
    flat = w.reshape(-1).float()
    pad = (-flat.numel()) % block
    amax = torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, block).amax(1)
    ok = torch.isfinite(amax) & (amax > 0)
    safe = torch.where(ok, amax, torch.ones_like(amax))
    return torch.where(ok, safe / torch.exp2(torch.floor(torch.log2(safe))), torch.ones_like(amax))


def _apply_scales(flat: torch.Tensor, scales: torch.Tensor, block: int, inverse: bool) -> torch.Tensor:
    pad = (-flat.numel()) % block
    x = torch.nn.functional.pad(flat.float(), (0, pad)).view(-1, block)
    x = x * scales[:, None] if inverse else x / scales[:, None]
    return x.reshape(-1)[: flat.numel()]


def split(w: torch.Tensor, k: int | None = None, block: int | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(exponent symbols uint8 (n,), sign<<k | kept mantissa as int32 (n,), block scales or None)."""
    fmt = float_format(w.dtype)
    k = check_mantissa_bits(w.dtype, k)
    flat = w.detach().reshape(-1)
    scales = None
    if block is not None:
        if k == fmt.man_bits:
            raise ValueError("block normalisation is for lossy modes (mantissa_bits < full width)")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        scales = block_scales(flat, block)
        flat = _apply_scales(flat, scales, block, inverse=False).to(w.dtype)
    bits = flat.view(fmt.int_dtype).to(torch.int64) & ((1 << fmt.bits) - 1)
    sign = bits >> (fmt.bits - 1)
    mag = bits & ((1 << (fmt.bits - 1)) - 1)
    shift = fmt.man_bits - k
    if shift:
        exp_all = (1 << fmt.exp_bits) - 1
        is_nan = mag > (exp_all << fmt.man_bits)
        is_inf = mag == (exp_all << fmt.man_bits)
        if k == 0 and bool(is_nan.any()):
            raise ValueError("lossy NeuZip with 0 mantissa bits cannot represent NaN weights")
        max_finite = ((exp_all - 1) << k) | ((1 << k) - 1)
        r = ((mag + (1 << (shift - 1))) >> shift).clamp(max=max_finite)
        r = torch.where(is_inf, torch.full_like(r, exp_all << k), r)
        if k:
            r = torch.where(is_nan, torch.full_like(r, (exp_all << k) | (1 << (k - 1))), r)
        mag = r
    exps = (mag >> k).to(torch.uint8)
    signman = ((sign << k) | (mag & ((1 << k) - 1))).to(torch.int32)
    return exps, signman, scales


def combine(exps: torch.Tensor, signman: torch.Tensor, k: int, dtype: torch.dtype,
            scales: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
    """Inverse of split: flat tensor of `dtype` (n,) on exps' device."""
    fmt = float_format(dtype)
    sm = signman.to(torch.int32)
    e = exps.to(torch.int32)
    bits = ((sm >> k) << (fmt.bits - 1)) | (e << fmt.man_bits) | ((sm & ((1 << k) - 1)) << (fmt.man_bits - k))
    if fmt.int_dtype == torch.int16:
        bits = torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16)
    out = bits.view(dtype)
    if scales is not None:
        out = _apply_scales(out, scales.to(out.device), block, inverse=True).to(dtype)
    return out


def combine_scales(x: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """Undo block normalisation of a flat decoded tensor (same arithmetic as `combine`)."""
    return _apply_scales(x, scales.to(x.device), block, inverse=True).to(x.dtype)


def pack_bits(v: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative ints of `width` bits (1..32) into uint8: whole byte planes first, then the rest bit-packed."""
    n = v.numel()
    v = v.to(torch.int64)
    parts = []
    while width >= 8:
        parts.append((v & 0xFF).to(torch.uint8))
        v, width = v >> 8, width - 8
    if width:
        g = torch.nn.functional.pad(v, (0, (-n) % 8)).view(-1, 8)
        word = (g << (torch.arange(8, device=v.device) * width)).sum(1)
        parts.append(((word[:, None] >> (torch.arange(width, device=v.device) * 8)) & 0xFF).to(torch.uint8).reshape(-1))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=v.device)


def packed_nbytes(n: int, width: int) -> int:
    return (width // 8) * n + (-(-n // 8) * (width % 8))


def unpack_bits(buf: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits -> int32 (n,)."""
    if buf.numel() != packed_nbytes(n, width):
        raise ValueError(f"packed sign/mantissa buffer has {buf.numel()} bytes, expected {packed_nbytes(n, width)}")
    out = torch.zeros(n, dtype=torch.int32, device=buf.device)
    shift, pos = 0, 0
    while width - shift >= 8:
        out |= buf[pos: pos + n].to(torch.int32) << shift
        pos, shift = pos + n, shift + 8
    rest = width - shift
    if rest:
        g = buf[pos:].to(torch.int64).view(-1, rest)
        word = (g << (torch.arange(rest, device=buf.device) * 8)).sum(1)
        vals = (word[:, None] >> (torch.arange(8, device=buf.device) * rest)) & ((1 << rest) - 1)
        out |= (vals.reshape(-1)[:n].to(torch.int32)) << shift
    return out
