"""Pure-torch reference twin of the rANS coder (kernels/ans/__init__.py): same state machine, same byte layout.

Vectorised across lanes (one torch op per step over all lanes), so it is exact but only fast when there are many
lanes and few steps. Tests compare the C++ and Triton paths against it; it is also the CPU fallback when no C++
compiler is available. Constants and layout are documented in kernels/ans/__init__.py.
"""

from __future__ import annotations

import torch

ANS_L = 1 << 16  # lower bound of the normalised state interval [L, L << 16)


def encode(symbols: torch.Tensor, lanes: int, freqs: torch.Tensor, cum: torch.Tensor, prob_bits: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(words int16, lane_offsets int64, final_states int64) for uint8 `symbols` with a (256,) frequency table."""
    n = symbols.numel()
    steps = -(-n // lanes)
    f = freqs.to(torch.int64)
    c = cum.to(torch.int64)
    sym = symbols.to(torch.int64)
    if n and bool((f[sym] == 0).any()):
        i = int(torch.nonzero(f[sym] == 0)[0])
        raise ValueError(f"symbol {int(symbols[i])} at index {i} has frequency 0 in the given table")
    x = torch.full((lanes,), ANS_L, dtype=torch.int64)
    emitted = torch.zeros((steps, lanes), dtype=torch.bool)
    values = torch.zeros((steps, lanes), dtype=torch.int64)
    xmax = ((ANS_L >> prob_bits) << 16) * f
    for t in range(steps - 1, -1, -1):
        s = sym[t * lanes: (t + 1) * lanes]
        k = s.numel()
        xs = x[:k]
        out = xs >= xmax[s]
        emitted[t, :k] = out
        values[t, :k] = xs & 0xFFFF
        xs = torch.where(out, xs >> 16, xs)
        fs = f[s]
        x[:k] = ((xs // fs) << prob_bits) + xs % fs + c[s]
    # decode order of lane j is ascending t; lanes are concatenated
    words = values.T[emitted.T]
    counts = emitted.sum(0)
    offsets = torch.zeros(lanes + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    words = torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16)
    return words, offsets, x


def decode(words: torch.Tensor, offsets: torch.Tensor, states: torch.Tensor, n: int, lanes: int,
           slot_sym: torch.Tensor, freqs: torch.Tensor, cum: torch.Tensor, prob_bits: int) -> torch.Tensor:
    """uint8 symbols (n,); ValueError naming the first lane whose stream is inconsistent."""
    steps = -(-n // lanes)
    mask = (1 << prob_bits) - 1
    w = torch.cat([words.to(torch.int64) & 0xFFFF, torch.zeros(1, dtype=torch.int64)])
    total = int(offsets[-1])
    f = freqs.to(torch.int64)
    c = cum.to(torch.int64)
    ss = slot_sym.to(torch.int64)
    x = states.to(torch.int64).clone()
    p = offsets[:-1].clone()
    out = torch.empty(n, dtype=torch.uint8)
    for t in range(steps):
        k = min(lanes, n - t * lanes)
        xs, ps = x[:k], p[:k]
        slot = xs & mask
        s = ss[slot]
        out[t * lanes: t * lanes + k] = s.to(torch.uint8)
        xs = f[s] * (xs >> prob_bits) + slot - c[s]
        need = xs < ANS_L
        xs = torch.where(need, (xs << 16) | w[ps.clamp(max=total)], xs)
        x[:k], p[:k] = xs, ps + need
    bad = (x != ANS_L) | (p != offsets[1:])
    if bool(bad.any()):
        raise ValueError(f"corrupt rANS stream: lane {int(torch.nonzero(bad)[0])} does not decode to its start state")
    return out
