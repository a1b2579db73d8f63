"""FM-Delta symbolisation and raw-bit packing on the GPU: four Triton kernels with the bytes of fmdelta_ref.py.

The torch twin (kernels/fmdelta/reference.py) takes ~25 int64 passes over a tensor; here encode is two
launches and decode two, each reading and writing every element once:
  encode  `_symbolise`  base, fine-tuned bits -> symbol (uint8), raw-bit count k (uint8), raw bits (int64), plus the
                        symbol histogram and the bits per raw block (atomics, one per program);
          `_pack`       one program per raw block scans its k in chunks (prefix sums) and ORs each element's bits
                        into the zeroed words (an element spans at most two words; blocks start on a fresh word);
  decode  `_ksym`       symbols + base -> k, the bits per raw block (checked against the block table) and an error
                        flag for symbols outside the alphabet;
          `_unpack`     the same per-block scan, reading the words back and rebuilding the fine-tuned bits.
Every integer is widened to int64 and wrapped to W bits explicitly, so no step relies on how narrow integer types
promote. Offsets are 64-bit. Reductions use this module's own combine functions (see kernels/nf4/matmul.py `_add`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 2048  # elements per program step; divides every raw block size the codec uses (a power of two >= 2048)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _wrap(x, W: tl.constexpr):
    """x (int64) reduced to a signed W-bit value, sign-extended back to int64."""
    if W == 64:  # one return for both branches: the compiler does not treat an early return as ending the body
        y = x
    else:
        y = ((x + (1 << (W - 1))) & ((1 << W) - 1)) - (1 << (W - 1))
    return y


@triton.jit
def _key(x, W: tl.constexpr):
    """The order-preserving signed key of float bits x (sign-extended int64); an involution."""
    return tl.where(x < 0, x ^ ((1 << (W - 1)) - 1), x)


@triton.jit
def _context(b, SHIFT: tl.constexpr, MASK: tl.constexpr):
    return (b >> SHIFT) & MASK


@triton.jit
def _symbolise(base_ptr, ft_ptr, sym_ptr, k_ptr, low_ptr, hist_ptr, bits_ptr, n,
               W: tl.constexpr, SHIFT: tl.constexpr, MASK: tl.constexpr, BLOCK: tl.constexpr, CH: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * CH + tl.arange(0, CH)
    valid = offs < n
    b = tl.load(base_ptr + offs, mask=valid, other=0).to(tl.int64)
    f = tl.load(ft_ptr + offs, mask=valid, other=0).to(tl.int64)
    d = _wrap(_key(f, W) - _key(b, W), W)
    neg = d < 0
    mag = tl.where(neg, -d, d).to(tl.uint64, bitcast=True)  # W=64, d=-2^63: stays 2^63 as unsigned
    k = tl.full((CH,), 0, tl.int64)
    m = mag
    for sh in tl.static_range(6):  # index of the leading one, by halving: 32, 16, ..., 1
        step = 32 >> sh
        t = m >> step
        hit = t != 0
        k += tl.where(hit, step, 0)
        m = tl.where(hit, t, m)
    zero = d == 0
    k = tl.where(zero, 0, k)
    low = tl.where(zero, 0, (mag - (tl.full((CH,), 1, tl.uint64) << k.to(tl.uint64))).to(tl.int64, bitcast=True))
    t = (k + _context(b, SHIFT, MASK)) % W
    sym = tl.where(zero, 0, 1 + neg.to(tl.int64) * W + t)
    tl.store(sym_ptr + offs, sym.to(tl.uint8), mask=valid)
    tl.store(k_ptr + offs, k.to(tl.uint8), mask=valid)
    tl.store(low_ptr + offs, low, mask=valid)
    tl.atomic_add(hist_ptr + tl.arange(0, 256), tl.histogram(sym.to(tl.int32), 256, mask=valid).to(tl.int64),
                  sem="relaxed")
    kk = tl.where(valid, k, 0)
    tl.atomic_add(bits_ptr + (tl.program_id(0).to(tl.int64) * CH) // BLOCK, tl.reduce(kk, 0, _add), sem="relaxed")


@triton.jit
def _pack(k_ptr, low_ptr, start_ptr, words_ptr, n, BLOCK: tl.constexpr, CH: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    run = tl.load(start_ptr + blk) * 64  # bit offset where this raw block starts
    for c in range(0, BLOCK, CH):
        offs = blk * BLOCK + c + tl.arange(0, CH)
        valid = offs < n
        k = tl.load(k_ptr + offs, mask=valid, other=0).to(tl.int64)
        low = tl.load(low_ptr + offs, mask=valid, other=0)
        off = run + tl.associative_scan(k, 0, _add) - k
        run += tl.reduce(k, 0, _add)
        w = off >> 6
        s = off & 63
        tl.atomic_or(words_ptr + w, low << s, mask=valid & (k > 0), sem="relaxed")
        tl.atomic_or(words_ptr + w + 1, (low >> 1) >> (63 - s), mask=valid & (s + k > 64), sem="relaxed")


@triton.jit
def _ksym(base_ptr, sym_ptr, k_ptr, bits_ptr, err_ptr, n,
          W: tl.constexpr, SHIFT: tl.constexpr, MASK: tl.constexpr, BLOCK: tl.constexpr, CH: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * CH + tl.arange(0, CH)
    valid = offs < n
    b = tl.load(base_ptr + offs, mask=valid, other=0).to(tl.int64)
    s = tl.load(sym_ptr + offs, mask=valid, other=0).to(tl.int64)
    t = tl.where(s > W, s - 1 - W, s - 1)
    k = ((t - _context(b, SHIFT, MASK)) % W + W) % W
    k = tl.where(s == 0, 0, k)
    tl.store(k_ptr + offs, k.to(tl.uint8), mask=valid)
    tl.atomic_max(err_ptr, tl.reduce(tl.where(valid, s, 0), 0, _max), sem="relaxed")
    tl.atomic_add(bits_ptr + (tl.program_id(0).to(tl.int64) * CH) // BLOCK, tl.reduce(tl.where(valid, k, 0), 0, _add),
                  sem="relaxed")


@triton.jit
def _unpack(base_ptr, sym_ptr, k_ptr, start_ptr, words_ptr, out_ptr, n, n_words,
            W: tl.constexpr, BLOCK: tl.constexpr, CH: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    run = tl.load(start_ptr + blk) * 64
    for c in range(0, BLOCK, CH):
        offs = blk * BLOCK + c + tl.arange(0, CH)
        valid = offs < n
        k = tl.load(k_ptr + offs, mask=valid, other=0).to(tl.int64)
        off = run + tl.associative_scan(k, 0, _add) - k
        run += tl.reduce(k, 0, _add)
        w = off >> 6
        s = off & 63
        lo = tl.load(words_ptr + w, mask=valid & (k > 0) & (w < n_words), other=0).to(tl.uint64, bitcast=True)
        hi = tl.load(words_ptr + w + 1, mask=valid & (s + k > 64) & (w + 1 < n_words), other=0)
        bits = (lo >> s.to(tl.uint64)).to(tl.int64, bitcast=True) | ((hi << (63 - s)) << 1)
        low = bits & ((tl.full((CH,), 1, tl.int64) << k) - 1)
        sym = tl.load(sym_ptr + offs, mask=valid, other=0).to(tl.int64)
        mag = tl.where(sym == 0, 0, (tl.full((CH,), 1, tl.int64) << k) | low)
        d = tl.where(sym > W, -mag, mag)
        b = tl.load(base_ptr + offs, mask=valid, other=0).to(tl.int64)
        out = _key(_wrap(_key(b, W) + d, W), W)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=valid)


def _starts(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(words per raw block, first word of each block) from the bits per block."""
    block_words = (bits + 63) // 64
    return block_words, torch.cumsum(block_words, 0) - block_words


def encode(base_bits: torch.Tensor, ft_bits: torch.Tensor, shift: int, mask: int, block: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(symbols uint8, block_words int64, words int64, symbol histogram int64 (256,)) - fmdelta_ref.encode's bytes."""
    if block % CHUNK:
        raise ValueError(f"raw-bit block {block} must be a multiple of {CHUNK}")
    dev, n, width = base_bits.device, base_bits.numel(), base_bits.element_size() * 8
    nblocks = -(-n // block)
    sym = torch.empty(n, dtype=torch.uint8, device=dev)
    k = torch.empty(n, dtype=torch.uint8, device=dev)
    low = torch.empty(n, dtype=torch.int64, device=dev)
    hist = torch.zeros(256, dtype=torch.int64, device=dev)
    bits = torch.zeros(max(nblocks, 1), dtype=torch.int64, device=dev)
    if n:
        _symbolise[(triton.cdiv(n, CHUNK),)](base_bits, ft_bits, sym, k, low, hist, bits, n, W=width, SHIFT=shift,
                                              MASK=mask, BLOCK=block, CH=CHUNK)
    block_words, start = _starts(bits[:nblocks])
    total = int(block_words.sum()) if nblocks else 0
    words = torch.zeros(total + 1, dtype=torch.int64, device=dev)  # +1: a spill past the last word lands nowhere
    if n:
        _pack[(nblocks,)](k, low, start, words, n, BLOCK=block, CH=CHUNK)
    return sym, block_words, words[:total], hist


def decode(base_bits: torch.Tensor, sym: torch.Tensor, block_words: torch.Tensor, words: torch.Tensor, shift: int,
           mask: int, block: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fine-tuned bits (base's integer dtype) - fmdelta_ref.decode; ValueError on an inconsistent payload.

    `out` (contiguous, base's dtype and size) receives them in place: the codec decodes straight into its result."""
    if block % CHUNK:
        raise ValueError(f"raw-bit block {block} must be a multiple of {CHUNK}")
    dev, n, width = base_bits.device, base_bits.numel(), base_bits.element_size() * 8
    nblocks = -(-n // block)
    if out is None:
        out = torch.empty_like(base_bits)
    elif out.dtype != base_bits.dtype or out.numel() != n or not out.is_contiguous() or out.device != dev:
        raise ValueError(f"decode out= must be a contiguous {base_bits.dtype} tensor of {n} elements on {dev}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if n == 0:
        return out
    k = torch.empty(n, dtype=torch.uint8, device=dev)
    bits = torch.zeros(nblocks, dtype=torch.int64, device=dev)
    err = torch.zeros(1, dtype=torch.int64, device=dev)
    _ksym[(triton.cdiv(n, CHUNK),)](base_bits, sym, k, bits, err, n, W=width, SHIFT=shift, MASK=mask, BLOCK=block,
                                    CH=CHUNK)
    expect, start = _starts(bits)
    bad_sym, bad_bits = (err > 2 * width).any(), (expect != block_words.to(dev)).any()
    if bool(bad_sym):
        raise ValueError("corrupt FM-Delta payload: symbol outside the alphabet")
    if bool(bad_bits):
        raise ValueError("corrupt FM-Delta payload: raw-bit stream does not match the symbols")
    _unpack[(nblocks,)](base_bits, sym, k, start, words, out, n, words.numel(), W=width, BLOCK=block, CH=CHUNK)
    return out
