"""Would a different rANS word layout or decode table make NeuZip's decode faster? A measurement before a format change.

Today (kernels/ans/__init__.py) each lane's 16-bit words are stored contiguously, lane after lane, so at every step the lanes
of a warp that renormalise read from up to 32 far-apart addresses, and the slot table holds 8 bytes per slot (32 KiB
at 12 probability bits). Two candidates, each checked bit-exact against the library decoder on the same stream:
- grouped words: the words of a group of G consecutive lanes interleaved in the order they are read (step by step,
  lane by lane), so the lanes of a group that renormalise at a step read consecutive words (one or two cache lines);
  each lane finds its word by an exclusive prefix sum of the group's `need` flags. Streams are re-laid out here from
  the library's encoding by simulating the decode (an encoder could emit this order directly).
- 4-byte table: symbol | (slot - cum) << 8 | (freq - 1) << 20 (prob_bits <= 12), half the table footprint
  (kernels/ans_triton.slot_table wide=False; the library decoder has it behind DECODE_TABLE32).
Symbols only (the sign/mantissa merge is the same in every variant). GB/s = dense bf16 bytes the symbols stand for
/ median kernel time (triton do_bench). Writes experiments/results/ans_layout_proto.md.
Usage: python experiments/ans_layout_proto.py [--sizes 128,512] [--spl 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memfit.kernels.ans import ANS_L, ans_encode  # noqa: E402
from memfit.kernels.ans.gpu import launch_decode, slot_table  # noqa: E402


@triton.jit
def _decode_proto(words_ptr, starts_ptr, states_ptr, tab_ptr, out_ptr, n, lanes, steps, PROB_BITS: tl.constexpr,
                  BLOCK: tl.constexpr, G: tl.constexpr, GROUPED: tl.constexpr, TAB32: tl.constexpr):
    """Symbols of BLOCK lanes. GROUPED: `starts` holds each group's first word (groups of G lanes); else each lane's."""
    lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lm = lane < lanes
    x = tl.load(states_ptr + lane, mask=lm, other=65536).to(tl.uint32)
    NG: tl.constexpr = BLOCK // G
    if GROUPED:
        grp = tl.program_id(0).to(tl.int64) * NG + tl.arange(0, NG)
        gp = tl.load(starts_ptr + grp, mask=grp * G < lanes, other=0)
        p = lane * 0
    else:
        gp = tl.zeros((NG,), tl.int64)
        p = tl.load(starts_ptr + lane, mask=lm, other=0)
    idx = lane
    for _ in range(steps):
        active = lm & (idx < n)
        slot = x & ((1 << PROB_BITS) - 1)
        if TAB32:
            e = tl.load(tab_ptr + slot).to(tl.uint32, bitcast=True)
            s = e & 0xFF
            xn = ((e >> 20) + 1) * (x >> PROB_BITS) + ((e >> 8) & 0xFFF)
        else:
            e = tl.load(tab_ptr + slot)
            s = (e & 0xFF).to(tl.uint32)
            xn = (e >> 24).to(tl.uint32) * (x >> PROB_BITS) + ((e >> 8) & 0xFFFF).to(tl.uint32)
        need = active & (xn < 65536)
        if GROUPED:
            nd = tl.reshape(need.to(tl.int32), (NG, G))  # 32-bit scan: half the shuffles of a 64-bit one
            at = tl.reshape(gp[:, None] + (tl.cumsum(nd, 1) - nd).to(tl.int64), (BLOCK,))
            gp += tl.sum(nd, 1).to(tl.int64)
        else:
            at = p
            p += need.to(tl.int64)
        w = (tl.load(words_ptr + at, mask=need, other=0).to(tl.int32) & 0xFFFF).to(tl.uint32)
        x = tl.where(active, tl.where(need, (xn << 16) | w, xn), x)
        tl.store(out_ptr + idx, s.to(tl.uint8), mask=active)
        idx += lanes


def reads(enc) -> torch.Tensor:
    """bool [steps, lanes]: whether lane l reads a word at step t, by simulating the decode with torch ops."""
    dev, lanes, n, pb = enc.words.device, enc.lanes, enc.n, enc.prob_bits
    steps = -(-n // lanes)
    f = torch.zeros(256, dtype=torch.int64, device=dev)
    f[: enc.freqs.numel()] = enc.freqs.to(dev, torch.int64)
    cum = torch.cumsum(f, 0) - f
    slot_sym = torch.repeat_interleave(torch.arange(256, device=dev), f, output_size=1 << pb)
    words = enc.words.to(torch.int64) & 0xFFFF
    x, pos = enc.final_states.to(dev, torch.int64).clone(), enc.lane_offsets[:-1].to(dev).clone()
    out = torch.zeros(steps, lanes, dtype=torch.bool, device=dev)
    for t in range(steps):
        k = min(lanes, n - t * lanes)
        xa = x[:k]
        slot = xa & ((1 << pb) - 1)
        s = slot_sym[slot]
        xn = f[s] * (xa >> pb) + slot - cum[s]
        need = xn < ANS_L
        w = words[pos[:k].clamp(max=max(words.numel() - 1, 0))] if words.numel() else torch.zeros_like(xn)
        x[:k] = torch.where(need, (xn << 16) | w, xn)
        pos[:k] += need
        out[t, :k] = need
    return out


def to_groups(enc, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(words in grouped order, first word of each group) of the library's encoding `enc`."""
    need = reads(enc)
    steps, lanes = need.shape
    ng = -(-lanes // g)
    pad = torch.nn.functional.pad(need, (0, ng * g - lanes))
    rank = torch.cumsum(pad.to(torch.int32), 0) - pad.to(torch.int32)  # which of its words lane l reads at step t
    first = torch.nn.functional.pad(enc.lane_offsets[:-1], (0, ng * g - lanes))
    src = first[None, :] + rank
    ev = pad.view(steps, ng, g).permute(1, 0, 2)
    words = enc.words[src.view(steps, ng, g).permute(1, 0, 2)[ev]]
    counts = ev.sum((1, 2))
    return words, torch.cumsum(counts, 0) - counts


def decode_proto(enc, words: torch.Tensor, starts: torch.Tensor, tab: torch.Tensor, *, grouped: bool, g: int,
                 block: int = 128, warps: int = 4) -> torch.Tensor:
    out = torch.empty(enc.n, dtype=torch.uint8, device=words.device)
    steps = -(-enc.n // enc.lanes)
    _decode_proto[(triton.cdiv(enc.lanes, block),)](
        words if words.numel() else starts, starts, enc.final_states, tab, out, enc.n, enc.lanes, steps,
        PROB_BITS=enc.prob_bits, BLOCK=block, G=g if grouped else block, GROUPED=grouped, TAB32=tab.dtype == torch.int32,
        num_warps=warps)
    return out


def variants(enc, block: int, g: int) -> dict[str, tuple]:
    """name -> (words, starts, table, grouped, G): the library layout and the candidates."""
    dev = enc.words.device
    gw, gs = to_groups(enc, g)
    t64, t32 = (slot_table(enc.freqs, enc.prob_bits, dev, wide=w) for w in (True, False))
    lw, ls = enc.words, enc.lane_offsets
    return {"per-lane words, 8-byte table": (lw, ls, t64, False, block),
            "per-lane words, 4-byte table": (lw, ls, t32, False, block),
            f"grouped words (G={g}), 8-byte table": (gw, gs, t64, True, g),
            f"grouped words (G={g}), 4-byte table": (gw, gs, t32, True, g)}


def exponent_symbols(n: int, device: str) -> torch.Tensor:
    """bf16 exponent fields of N(0, 0.02) weights: NeuZip's symbol stream."""
    w = (0.02 * torch.randn(n, generator=torch.Generator(device=device).manual_seed(0), device=device)).bfloat16()
    return ((w.view(torch.int16).to(torch.int32) >> 7) & 0xFF).to(torch.uint8)


def bench_size(mb: int, spl: int, shapes: list[tuple[int, int]], group_sizes: list[int], prob_bits: int = 12
               ) -> list[tuple]:
    """Rows (MB, prob_bits, bits/symbol, variant, shape, G, GB/s, bit-exact) for one stream of `mb` dense-bf16
    megabytes coded with `prob_bits`-bit probabilities (fewer bits: a smaller table, a few hundredths of a bit more
    per symbol)."""
    from triton.testing import do_bench

    def timed(fn) -> float:
        return do_bench(fn, warmup=10, rep=50, return_mode="median")

    n = mb * 1_000_000 // 2
    sym = exponent_symbols(n, "cuda")
    enc = ans_encode(sym, lanes=-(-n // spl), prob_bits=prob_bits)
    tab = enc.decode_table()
    bps = 8 * enc.nbytes / n
    base = torch.empty(n, dtype=torch.uint8, device=sym.device)
    t_lib = timed(lambda: launch_decode(enc.words, enc.lane_offsets, enc.final_states, tab, n, enc.lanes,
                                        enc.prob_bits, base))
    rows = [(mb, prob_bits, bps, "library decoder (kernels/ans/gpu.py)", "128x4", "-", 2 * n / t_lib / 1e6,
             torch.equal(base, sym))]
    for block, warps in shapes:
        groups = [g for g in group_sizes if block % g == 0]
        for g in groups:
            for name, (w, s, t, grouped, gg) in variants(enc, block, g).items():
                if not grouped and g != groups[0]:
                    continue  # the per-lane rows do not depend on G

                def run(w=w, s=s, t=t, grouped=grouped, gg=gg, block=block, warps=warps) -> torch.Tensor:
                    return decode_proto(enc, w, s, t, grouped=grouped, g=gg, block=block, warps=warps)

                ok = torch.equal(run(), sym)
                rows.append((mb, prob_bits, bps, name, f"{block}x{warps}", gg if grouped else "-",
                             2 * n / timed(run) / 1e6, ok))
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="128,512", help="dense bf16 MB")
    ap.add_argument("--spl", type=int, default=256, help="symbols per lane")
    ap.add_argument("--shapes", default="128x4,256x8", help="lanes per program x warps")
    ap.add_argument("--groups", default="32,128,256", help="lanes per word group (each shape uses those dividing its "
                    "lanes per program; G = lanes per program needs no reshape in the kernel)")
    ap.add_argument("--prob-bits", default="12,10", help="probability bits (table of 2**b entries) to compare")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "ans_layout_proto.md"))
    a = ap.parse_args()
    shapes = [tuple(int(v) for v in sh.split("x")) for sh in a.shapes.split(",")]
    groups = [int(v) for v in a.groups.split(",")]
    rows = []
    for mb in (int(v) for v in a.sizes.split(",")):
        for pb in (int(v) for v in a.prob_bits.split(",")):
            rows += bench_size(mb, a.spl, shapes, groups, pb)
            torch.cuda.empty_cache()
    lines = ["# rANS decode: word layout and table width (prototype, symbols only)", "",
             f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
             f"{a.spl} symbols per lane; bf16 N(0, 0.02) exponents", "",
             "| MB (dense bf16) | prob bits | stream bits/symbol | variant | lanes x warps | G | GB/s | bit-exact |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {mb} | {pb} | {bps:.4f} | {name} | {shape} | {g} | {gbs:.0f} | {ok} |"
              for mb, pb, bps, name, shape, g, gbs, ok in rows]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
