"""Triton path of the rANS coder (kernels/ans.py): one lane per GPU thread, same state machine and byte layout.

Decode walks the steps of its lanes in lock-step: at step t the lanes of a program write consecutive output bytes
(coalesced); each lane reads its own word stream, at most one 16-bit word per symbol. A single 64-bit table entry per
probability slot holds (symbol, slot - cum, freq), so a step costs one table gather. Encode mirrors it backwards,
writing each lane's words from the end of a private scratch region that is compacted afterwards. No host sync in
decode unless `validate` asks for the end-state check.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ANS_L = 1 << 16


@triton.jit
def _decode_kernel(words_ptr, offs_ptr, states_ptr, tab_ptr, out_ptr, end_x_ptr, end_p_ptr, n, lanes, steps,
                   PROB_BITS: tl.constexpr, BLOCK: tl.constexpr):
    lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lm = lane < lanes
    x = tl.load(states_ptr + lane, mask=lm, other=65536).to(tl.uint32)
    p = tl.load(offs_ptr + lane, mask=lm, other=0)
    idx = lane
    for _ in range(steps):
        active = lm & (idx < n)
        e = tl.load(tab_ptr + (x & ((1 << PROB_BITS) - 1)))
        s = (e & 0xFF).to(tl.uint8)
        xn = (e >> 24).to(tl.uint32) * (x >> PROB_BITS) + ((e >> 8) & 0xFFFF).to(tl.uint32)
        need = active & (xn < 65536)
        w = (tl.load(words_ptr + p, mask=need, other=0).to(tl.int32) & 0xFFFF).to(tl.uint32)
        xn = tl.where(need, (xn << 16) | w, xn)
        x = tl.where(active, xn, x)
        p += need.to(tl.int64)
        tl.store(out_ptr + idx, s, mask=active)
        idx += lanes
    tl.store(end_x_ptr + lane, x.to(tl.int64), mask=lm)
    tl.store(end_p_ptr + lane, p, mask=lm)


@triton.jit
def _encode_kernel(sym_ptr, freq_ptr, cum_ptr, scratch_ptr, nwords_ptr, states_ptr, n, lanes, steps,
                   PROB_BITS: tl.constexpr, BLOCK: tl.constexpr):
    lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lm = lane < lanes
    x = tl.full((BLOCK,), 65536, tl.uint32)
    p = tl.full((BLOCK,), 0, tl.int64) + steps
    region = scratch_ptr + lane * steps
    lanes64 = tl.full((BLOCK,), 0, tl.int64) + lanes
    idx = lane + lanes64 * (steps - 1)
    for _ in range(steps):
        active = lm & (idx < n)
        s = tl.load(sym_ptr + idx, mask=active, other=0).to(tl.int32)
        f = tl.load(freq_ptr + s, mask=active, other=1)
        c = tl.load(cum_ptr + s, mask=active, other=0)
        emit = active & (x.to(tl.int64) >= (f.to(tl.int64) << (32 - PROB_BITS)))
        v = (x & 0xFFFF).to(tl.int32)
        v = tl.where(v >= 32768, v - 65536, v).to(tl.int16)
        tl.store(region + p - 1, v, mask=emit)
        p -= emit.to(tl.int64)
        xs = tl.where(emit, x >> 16, x)
        fu = tl.where(active, f, 1).to(tl.uint32)
        q = xs // fu
        xn = (q << PROB_BITS) + (xs - q * fu) + c.to(tl.uint32)
        x = tl.where(active, xn, x)
        idx -= lanes64
    tl.store(states_ptr + lane, x.to(tl.int64), mask=lm)
    tl.store(nwords_ptr + lane, steps - p, mask=lm)


def _slot_table(slot_sym: torch.Tensor, freqs: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
    """int64 per slot: symbol | (slot - cum) << 8 | freq << 24."""
    s = slot_sym.to(torch.int64)
    slots = torch.arange(s.numel(), dtype=torch.int64)
    return s | ((slots - cum[s]) << 8) | (freqs[s] << 24)


def decode(words: torch.Tensor, offsets: torch.Tensor, states: torch.Tensor, n: int, lanes: int,
           slot_sym: torch.Tensor, freqs: torch.Tensor, cum: torch.Tensor, prob_bits: int, *,
           validate: bool = True, block: int = 128, num_warps: int = 4) -> torch.Tensor:
    """uint8 (n,) on words' device; with `validate`, ValueError naming the first inconsistent lane (one sync)."""
    dev = words.device
    tab = _slot_table(slot_sym, freqs, cum).to(dev)
    out = torch.empty(n, dtype=torch.uint8, device=dev)
    end_x = torch.empty(lanes, dtype=torch.int64, device=dev)
    end_p = torch.empty(lanes, dtype=torch.int64, device=dev)
    w = torch.cat([words, words.new_zeros(1)])  # a masked-off load may still form the address one past the end
    steps = -(-n // lanes)
    _decode_kernel[(triton.cdiv(lanes, block),)](w, offsets, states, tab, out, end_x, end_p, n, lanes, steps,
                                                 PROB_BITS=prob_bits, BLOCK=block, num_warps=num_warps)
    if validate:
        bad = (end_x != ANS_L) | (end_p != offsets[1:])
        if bool(bad.any()):
            raise ValueError(f"corrupt rANS stream: lane {int(torch.nonzero(bad)[0])} does not decode to its start "
                             "state")
    return out


def encode(symbols: torch.Tensor, lanes: int, freqs: torch.Tensor, cum: torch.Tensor, prob_bits: int, *,
           block: int = 128, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(words int16, lane_offsets int64, final_states int64) on symbols' device."""
    dev = symbols.device
    n = symbols.numel()
    f = freqs.to(dev, torch.int32)
    if n and bool((f[symbols.long()] == 0).any()):
        i = int(torch.nonzero(f[symbols.long()] == 0)[0])
        raise ValueError(f"symbol {int(symbols[i])} at index {i} has frequency 0 in the given table")
    steps = -(-n // lanes)
    scratch = torch.empty(lanes * steps, dtype=torch.int16, device=dev)
    nwords = torch.empty(lanes, dtype=torch.int64, device=dev)
    states = torch.empty(lanes, dtype=torch.int64, device=dev)
    _encode_kernel[(triton.cdiv(lanes, block),)](symbols, f, cum.to(dev, torch.int32), scratch, nwords, states, n,
                                                 lanes, steps, PROB_BITS=prob_bits, BLOCK=block, num_warps=num_warps)
    valid = torch.arange(steps, device=dev)[None, :] >= (steps - nwords)[:, None]
    words = scratch.view(lanes, steps)[valid]
    offsets = torch.zeros(lanes + 1, dtype=torch.int64, device=dev)
    torch.cumsum(nwords, 0, out=offsets[1:])
    return words, offsets, states
