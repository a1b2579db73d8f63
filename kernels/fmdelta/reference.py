"""Pure-torch FM-Delta symbolisation and raw-bit packing: the GPU path and the CPU test oracle of the native code.

Same bytes as csrc/fmdelta.cpp. Works on the signed integer view of the floats: the order-preserving map
(negative: flip all bits but the sign) differs from the unsigned one of the paper by 2^(W-1), which cancels in the
wrapping difference, so `d = key(ft) - key(base)` in the native W-bit integer type is the paper's delta mod 2^W.
"""

from __future__ import annotations

import torch

SIGNED = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def signed_key(bits: torch.Tensor) -> torch.Tensor:
    """Order-preserving map of float bits (signed int view) to signed integers; an involution."""
    flip = torch.tensor(torch.iinfo(bits.dtype).max, dtype=bits.dtype, device=bits.device)
    return torch.where(bits < 0, bits ^ flip, bits)


def msb64(mag: torch.Tensor) -> torch.Tensor:
    """Index of the leading one of positive int64 values (int64 -2^63 counts as 2^63 -> 63)."""
    e = torch.frexp(mag.to(torch.float64))[1].to(torch.int64) - 1
    e = torch.where(mag < 0, torch.full_like(e, 63), e)
    # float rounding up past the leading one, also up to 2^63 (values >= 2^63 - 512): -2^63 (>> 63 = -1) is kept
    too_big = (e > 0) & ((mag >> e.clamp(0, 63)) == 0)
    return e - too_big.to(torch.int64)


def context(base_bits: torch.Tensor, shift: int, mask: int) -> torch.Tensor:
    """The base value's exponent field (or 0): the symbol model's conditioning variable."""
    return (base_bits.to(torch.int64) >> shift) & mask


def symbolise(base_bits: torch.Tensor, ft_bits: torch.Tensor, shift: int, mask: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(symbols uint8, k int64 raw-bit counts, low int64 raw bits) for same-dtype signed int views."""
    width = base_bits.element_size() * 8
    d = (signed_key(ft_bits) - signed_key(base_bits)).to(torch.int64)  # wraps in W bits
    zero = d == 0
    neg = d < 0
    mag = torch.where(neg, -d, d)  # for W=64 and d=-2^63 this stays -2^63, read as 2^63 by msb64
    k = torch.where(zero, torch.zeros_like(d), msb64(torch.where(zero, torch.ones_like(d), mag)))
    low = torch.where(zero, torch.zeros_like(d), mag - (torch.ones_like(k) << k))
    t = (k + context(base_bits, shift, mask)) % width
    sym = torch.where(zero, torch.zeros_like(d), 1 + neg.to(torch.int64) * width + t).to(torch.uint8)
    return sym, k, low


def desymbolise(base_bits: torch.Tensor, sym: torch.Tensor, k: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Fine-tuned bits from base bits, symbols, raw-bit counts and raw bits (inverse of `symbolise`)."""
    s = sym.to(torch.int64)
    width = base_bits.element_size() * 8
    neg = s > width
    mag = torch.where(s == 0, torch.zeros_like(k), (torch.ones_like(k) << k) | low)
    d = torch.where(neg, -mag, mag).to(base_bits.dtype)  # wraps back to W bits
    return signed_key(signed_key(base_bits) + d)


def k_from_symbols(base_bits: torch.Tensor, sym: torch.Tensor, shift: int, mask: int) -> torch.Tensor:
    width = base_bits.element_size() * 8
    s = sym.to(torch.int64)
    if bool((s > 2 * width).any()):
        raise ValueError("corrupt FM-Delta payload: symbol outside the alphabet")
    t = torch.where(s > width, s - 1 - width, s - 1)
    k = (t - context(base_bits, shift, mask)) % width
    return torch.where(s == 0, torch.zeros_like(k), k)


def bit_offsets(k: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit offset of each element's raw bits, and words per block (each block starts on a fresh 64-bit word)."""
    n = k.numel()
    nblocks = (n + block - 1) // block
    kb = torch.zeros(nblocks * block, dtype=torch.int64, device=k.device)
    kb[:n] = k
    kb = kb.view(nblocks, block)
    within = torch.cumsum(kb, 1) - kb
    block_words = (kb.sum(1) + 63) // 64
    start = (torch.cumsum(block_words, 0) - block_words) * 64
    return (within + start[:, None]).reshape(-1)[:n], block_words


def pack(k: torch.Tensor, low: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(words int64, block_words int64): raw bits LSB-first; every element spans at most two words."""
    off, block_words = bit_offsets(k, block)
    total = int(block_words.sum())
    w, s = off >> 6, off & 63
    words = torch.zeros(total + 2, dtype=torch.int64, device=k.device)  # k = 0 tails sit at `total`
    words.index_add_(0, w, low << s)
    words.index_add_(0, w + 1, (low >> 1) >> (63 - s))  # bits that spill into the next word (0 when s == 0)
    return words[:total], block_words


def unpack(k: torch.Tensor, words: torch.Tensor, block_words: torch.Tensor, block: int) -> torch.Tensor:
    """Raw bits per element from the packed words (inverse of `pack`)."""
    off, expect = bit_offsets(k, block)
    if not torch.equal(expect.cpu(), block_words.cpu()):
        raise ValueError("corrupt FM-Delta payload: raw-bit stream does not match the symbols")
    w, s = off >> 6, off & 63
    padded = torch.cat([words, words.new_zeros(2)])
    lo = (padded[w] >> s) & ~((torch.full_like(s, -1) << (63 - s)) << 1)
    hi = (padded[w + 1] << (63 - s)) << 1
    return (lo | hi) & ((torch.ones_like(k) << k) - 1)


def encode(base_bits: torch.Tensor, ft_bits: torch.Tensor, shift: int, mask: int, block: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sym, k, low = symbolise(base_bits, ft_bits, shift, mask)
    words, block_words = pack(k, low, block)
    return sym, block_words, words


def decode(base_bits: torch.Tensor, sym: torch.Tensor, block_words: torch.Tensor, words: torch.Tensor, shift: int,
           mask: int, block: int) -> torch.Tensor:
    k = k_from_symbols(base_bits, sym, shift, mask)
    low = unpack(k, words, block_words, block)
    return desymbolise(base_bits, sym, k, low)
