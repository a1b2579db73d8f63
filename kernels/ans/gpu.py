"""Triton path of the rANS coder (kernels/ans/__init__.py): one lane per GPU thread, same state machine and byte layout.

Decode walks the steps of its lanes in lock-step: at step t the lanes of a program write consecutive outputs
(coalesced); each lane reads its own word stream, at most one 16-bit word per symbol, never past its own end. A single
64-bit table entry per probability slot holds (symbol, slot - cum, freq), so a step costs one table gather; the table
is built on the device (`slot_table`, no host sync) and cached by the caller. The same kernel, with MERGE on, also
rebuilds NeuZip floats (exponent symbol + packed sign/mantissa) in the same pass, so dequantize is one launch. Encode
mirrors decode backwards, writing each lane's words from the end of a private scratch region that is compacted
afterwards. No host sync in decode unless `validate` asks for the end-state check.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ANS_L = 1 << 16


@triton.jit
def _load_sm(packed_ptr, idx, n, active, PLANES: tl.constexpr, REST: tl.constexpr, BLOCK: tl.constexpr):
    """The packed sign+mantissa field of elements idx (PLANES byte planes, then REST bits per element)."""
    sm = tl.full((BLOCK,), 0, tl.uint32)
    for b in tl.static_range(PLANES):
        sm |= tl.load(packed_ptr + b * n + idx, mask=active, other=0).to(tl.uint32) << (8 * b)
    if REST > 0:
        bit = (idx % 8) * REST
        at = packed_ptr + PLANES * n + (idx // 8) * REST + bit // 8
        lo = tl.load(at, mask=active, other=0).to(tl.uint32)
        hi = tl.load(at + 1, mask=active & (bit // 8 + 1 < REST), other=0).to(tl.uint32)
        sm |= (((lo | (hi << 8)) >> (bit % 8).to(tl.uint32)) & ((1 << REST) - 1)) << (8 * PLANES)
    return sm


@triton.jit
def _decode_kernel(words_ptr, offs_ptr, states_ptr, tab_ptr, packed_ptr, out_ptr, end_x_ptr, end_p_ptr, n, lanes, steps,
                   PROB_BITS: tl.constexpr, MERGE: tl.constexpr, K: tl.constexpr, MAN_BITS: tl.constexpr,
                   SIGN_SHIFT: tl.constexpr, WIDE: tl.constexpr, PLANES: tl.constexpr, REST: tl.constexpr, VALIDATE: tl.constexpr,
                   BLOCK: tl.constexpr, PREFETCH: tl.constexpr, TAB32: tl.constexpr):
    """Decode the lanes of one program; with MERGE, also rebuild each float from its exponent symbol and its
    sign+mantissa field (PLANES whole byte planes, then REST bits packed 8 values per REST bytes: see
    framework/quant/neuzip_codec.pack_bits) and store the float's bit pattern (int16, or int32 when WIDE)."""
    lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lm = lane < lanes
    x = tl.load(states_ptr + lane, mask=lm, other=65536).to(tl.uint32)
    p = tl.load(offs_ptr + lane, mask=lm, other=0)
    p_end = tl.load(offs_ptr + lane + 1, mask=lm, other=0)
    idx = lane
    if MERGE and PREFETCH:
        sm_next = _load_sm(packed_ptr, idx, n, lm & (idx < n), PLANES, REST, BLOCK)
    for _ in range(steps):
        active = lm & (idx < n)
        if TAB32:  # symbol | (slot - cum) << 8 | (freq - 1) << 20 (slot_table with wide=False)
            e = tl.load(tab_ptr + (x & ((1 << PROB_BITS) - 1))).to(tl.uint32, bitcast=True)
            s = e & 0xFF
            xn = ((e >> 20) + 1) * (x >> PROB_BITS) + ((e >> 8) & 0xFFF)
        else:
            e = tl.load(tab_ptr + (x & ((1 << PROB_BITS) - 1)))
            s = (e & 0xFF).to(tl.uint32)
            xn = (e >> 24).to(tl.uint32) * (x >> PROB_BITS) + ((e >> 8) & 0xFFFF).to(tl.uint32)
        need = active & (xn < 65536)
        # bounded by the lane's own words: a corrupt stream can never read outside `words` (no pad word needed)
        w = (tl.load(words_ptr + p, mask=need & (p < p_end), other=0).to(tl.int32) & 0xFFFF).to(tl.uint32)
        xn = tl.where(need, (xn << 16) | w, xn)
        x = tl.where(active, xn, x)
        p += need.to(tl.int64)
        if MERGE:
            if PREFETCH:  # this step's field was loaded one step ago; issue the next step's loads now
                sm = sm_next
                sm_next = _load_sm(packed_ptr, idx + lanes, n, lm & (idx + lanes < n), PLANES, REST, BLOCK)
            else:
                sm = _load_sm(packed_ptr, idx, n, active, PLANES, REST, BLOCK)
            bits = ((sm >> K) << SIGN_SHIFT) | (s << MAN_BITS) | ((sm & ((1 << K) - 1)) << (MAN_BITS - K))
            if WIDE:
                tl.store(out_ptr + idx, bits.to(tl.int32, bitcast=True), mask=active)
            else:
                tl.store(out_ptr + idx, bits.to(tl.int32).to(tl.int16), mask=active)
        else:
            tl.store(out_ptr + idx, s.to(tl.uint8), mask=active)
        idx += lanes
    if VALIDATE:
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


@triton.jit
def _histogram_kernel(sym_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Per-program 256-bin histogram of ITERS * BLOCK symbols, added to the global bins once: a skewed stream
    (one symbol dominates) does not serialise on one counter."""
    base = tl.program_id(0).to(tl.int64) * (BLOCK * ITERS)
    acc = tl.full((256,), 0, tl.int32)
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        s = tl.load(sym_ptr + offs, mask=offs < n, other=0).to(tl.int32)
        acc += tl.histogram(s, 256, mask=offs < n)
    tl.atomic_add(out_ptr + tl.arange(0, 256), acc.to(tl.int64), sem="relaxed")


def histogram(symbols: torch.Tensor, block: int = 4096, iters: int = 16) -> torch.Tensor:
    """int64 (256,) counts of a uint8 CUDA tensor, on its device."""
    out = torch.zeros(256, dtype=torch.int64, device=symbols.device)
    n = symbols.numel()
    if n:
        _histogram_kernel[(triton.cdiv(n, block * iters),)](symbols, out, n, BLOCK=block, ITERS=iters)
    return out


def slot_table(freqs: torch.Tensor, prob_bits: int, device: torch.device | str | None = None,
               wide: bool | None = None) -> torch.Tensor:
    """The decoder's entry per probability slot, built on `device` with no host sync: int64 symbol | (slot - cum) << 8
    | freq << 24, or (`wide=False`, prob_bits <= 12) the int32 bit pattern of symbol | (slot - cum) << 8 |
    (freq - 1) << 20, half the footprint in the L1 cache. `wide=None`: int32 where DECODE_TABLE32 and prob_bits
    allow. The decode kernel reads the layout from the table's dtype.

    `freqs` must already be valid (sums to 2**prob_bits): repeat_interleave is given that size instead of reading it.
    """
    if wide is None:
        wide = not (DECODE_TABLE32 and prob_bits <= 12)
    if not wide and prob_bits > 12:
        raise ValueError(f"the 4-byte slot table needs prob_bits <= 12, got {prob_bits}")
    f = freqs.to(device if device is not None else freqs.device, torch.int64)
    m = 1 << prob_bits
    sym = torch.repeat_interleave(torch.arange(f.numel(), device=f.device), f, output_size=m)
    cum = torch.cumsum(f, 0) - f
    rel = torch.arange(m, device=f.device) - cum[sym]
    if wide:
        return sym | (rel << 8) | (f[sym] << 24)
    v = sym | (rel << 8) | ((f[sym] - 1) << 20)
    return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32)


# launch shape of the decode kernel: lanes per program and warps; BLOCK > 32 * num_warps gives each thread several
# independent lanes (latency hiding by ILP). experiments/neuzip_speed.py sweeps these on the GPU.
DECODE_BLOCK = 128
DECODE_WARPS = 4
# load each step's sign/mantissa field one step early, so its memory latency overlaps the rANS step before it
DECODE_PREFETCH = True  # +10% at 128 MB on an H200 (experiments/neuzip_speed.py sweep)
# 4-byte decode-table entries (slot_table wide=False) for tables built from now on: half the L1 footprint of the
# random per-step gather; off until a GPU sweep (neuzip_speed.py shapes with a trailing t) shows it faster
DECODE_TABLE32 = False


def launch_decode(words: torch.Tensor, offsets: torch.Tensor, states: torch.Tensor, table: torch.Tensor, n: int,
                  lanes: int, prob_bits: int, out: torch.Tensor, *, packed: torch.Tensor | None = None,
                  mantissa_bits: int = 0, man_bits: int = 0, total_bits: int = 16, validate: bool = False,
                  block: int | None = None, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One launch, no host sync: decode into `out` (uint8 symbols, or with `packed` the merged floats' bit patterns as
    int16 / int32). Returns (end states, end positions) when `validate`, for the caller to check."""
    block = block or DECODE_BLOCK
    num_warps = num_warps or DECODE_WARPS
    dev = words.device
    merge = packed is not None
    width = 1 + mantissa_bits
    if validate:
        end_x = torch.empty(lanes, dtype=torch.int64, device=dev)
        end_p = torch.empty(lanes, dtype=torch.int64, device=dev)
    else:
        end_x = end_p = offsets  # never written (VALIDATE is off)
    if words.numel() == 0:
        words = offsets  # any valid pointer: every word load is masked off
    steps = -(-n // lanes) if n else 0
    _decode_kernel[(triton.cdiv(lanes, block),)](
        words, offsets, states, table, packed if merge else out, out, end_x, end_p, n, lanes, steps,
        PROB_BITS=prob_bits, MERGE=merge, K=mantissa_bits, MAN_BITS=man_bits, SIGN_SHIFT=total_bits - 1,
        WIDE=total_bits == 32, PLANES=width // 8, REST=width % 8, VALIDATE=validate, BLOCK=block,
        PREFETCH=DECODE_PREFETCH, TAB32=table.dtype == torch.int32, num_warps=num_warps)
    return (end_x, end_p) if validate else None


def check_ends(ends: tuple[torch.Tensor, torch.Tensor], offsets: torch.Tensor) -> None:
    """ValueError naming the first lane that did not end at ANS_L having consumed exactly its words (one sync)."""
    end_x, end_p = ends
    bad = (end_x != ANS_L) | (end_p != offsets[1:])
    if bool(bad.any()):
        raise ValueError(f"corrupt rANS stream: lane {int(torch.nonzero(bad)[0])} does not decode to its start state")


def decode(words: torch.Tensor, offsets: torch.Tensor, states: torch.Tensor, n: int, lanes: int,
           slot_sym: torch.Tensor | None, freqs: torch.Tensor, cum: torch.Tensor | None, prob_bits: int, *,
           validate: bool = True, table: torch.Tensor | None = None, block: int | None = None,
           num_warps: int | None = None) -> torch.Tensor:
    """uint8 (n,) on words' device; with `validate`, ValueError naming the first inconsistent lane (one sync).

    `table` (slot_table on words' device) is rebuilt from `freqs` when not given; slot_sym and cum are unused (kept
    for the signature shared with the CPU paths)."""
    tab = table if table is not None else slot_table(freqs, prob_bits, words.device)
    out = torch.empty(n, dtype=torch.uint8, device=words.device)
    ends = launch_decode(words, offsets, states, tab, n, lanes, prob_bits, out, validate=validate, block=block,
                         num_warps=num_warps)
    if ends is not None:
        check_ends(ends, offsets)
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
