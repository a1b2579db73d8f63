"""NeuZip GPU speed: decompression / compression throughput (GB/s of dense bf16) from 1 MB to 1 GB, against a dense
copy of the same tensor (the memory-bandwidth peer) in the same process; a sweep of the fused decode kernel's launch
shape (lanes per program, warps) and symbols per lane at the sizes that matter (a Llama-3-8B MLP matrix is 112 MiB);
and forward+backward of a Llama-3-8B-shaped MLP block (4096 -> 14336 -> 4096, 4096 tokens) with dense weights vs
NeuZip with and without the side-stream prefetch. Results are written as they come (a time-out keeps what was done)."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from memfit.kernels.ans import ans_decode
from memfit.kernels.ans import gpu as ans_triton
from memfit.kernels.settings import SETTINGS
from memfit.quant import neuzip_codec as codec
from memfit.quant import neuzip_prefetch as pf
from memfit.quant.neuzip import NeuZipTensor


def timed(fn, reps: int = 5) -> float:
    """Median seconds of `fn` on the current CUDA stream (after one warm-up)."""
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return sorted(ts)[len(ts) // 2]


def unfused(z: NeuZipTensor) -> torch.Tensor:
    """The previous dequantize (rANS decode, then separate torch ops for the merge): the baseline being replaced."""
    exps = ans_decode(z.enc, validate=False)
    sm = codec.unpack_bits(z.packed, 1 + z.mantissa_bits, z.numel())
    return codec.combine(exps, sm, z.mantissa_bits, z.dtype)


def weight(mb: int) -> torch.Tensor:
    n = mb * (1 << 20) // 2
    cols = 4096 if n >= 4096 * 64 else 256
    return (torch.randn(n // cols, cols, device="cuda") * 0.02).to(torch.bfloat16)


def set_launch(block: int, warps: int, prefetch: bool = False) -> None:
    ans_triton.DECODE_BLOCK, ans_triton.DECODE_WARPS, ans_triton.DECODE_PREFETCH = block, warps, prefetch


def set_table(z: NeuZipTensor, table32: bool) -> None:
    """Rebuild z's cached decode table with 4-byte (table32) or 8-byte entries."""
    z.enc.table = ans_triton.slot_table(z.enc.freqs, z.enc.prob_bits, z.enc.words.device, wide=not table32)


def parse_shape(s: str) -> tuple[int, int, bool, bool]:
    """'128x4pt' -> (lanes per program, warps, prefetch, 4-byte table)."""
    block, warps = (int(v) for v in s.rstrip("pt").split("x"))
    flags = s[len(s.rstrip("pt")):]
    return block, warps, "p" in flags, "t" in flags


def sweep_rows(sizes_mb: list[int], spls: list[int], shapes: list[tuple[int, int, bool, bool]]
               ) -> tuple[list[str], tuple]:
    """Fused dequantize GB/s per (size, spl, block, warps); returns the rows and the best (spl, block, warps) at the
    largest size <= 128 MB (the regime of real layer matrices)."""
    rows, best = [], {}
    for mb in sizes_mb:
        w = weight(mb)
        for spl in spls:
            z = NeuZipTensor.from_dense(w, symbols_per_lane=spl)
            assert torch.equal(z.dequantize().view(torch.int16), w.view(torch.int16))
            bits = 8 * z.compressed_nbytes / w.numel()
            for block, warps, pre, t32 in shapes:
                set_launch(block, warps, pre)
                set_table(z, t32)
                assert torch.equal(z.dequantize().view(torch.int16), w.view(torch.int16))
                t = timed(z.dequantize)
                gbs = w.numel() * 2 / t / 1e9
                best.setdefault(mb, []).append((gbs, spl, block, warps, pre, t32))
                rows.append(f"| {mb} | {spl} | {bits:.3f} | {block} | {warps} | {pre} | {4 if t32 else 8} | {gbs:.1f} |")
                print(rows[-1], flush=True)
            z = None
        w = None
        torch.cuda.empty_cache()
    key = max([m for m in best if m <= 128] or best)
    _, spl, block, warps, pre, t32 = max(best[key])
    return rows, (spl, block, warps, pre, t32)


def throughput_rows(sizes_mb: list[int], spl: int) -> list[str]:
    rows = []
    for mb in sizes_mb:
        w = weight(mb)
        nbytes = w.numel() * 2
        t_copy = timed(lambda w=w: w.clone())
        t_comp = timed(lambda w=w: NeuZipTensor.from_dense(w, symbols_per_lane=spl), reps=2)
        z = NeuZipTensor.from_dense(w, symbols_per_lane=spl)
        assert torch.equal(z.dequantize().view(torch.int16), w.view(torch.int16))
        t_dec = timed(z.dequantize)
        t_old = timed(lambda z=z: unfused(z))
        t_ans = timed(lambda z=z: ans_decode(z.enc, validate=False))
        bits = 8 * z.compressed_nbytes / w.numel()
        rows.append(f"| {mb} | {spl} | {bits:.3f} | {nbytes / t_dec / 1e9:.1f} | {nbytes / t_old / 1e9:.1f} | "
                    f"{nbytes / t_ans / 1e9:.1f} | {nbytes / t_comp / 1e9:.2f} | {nbytes / t_copy / 1e9:.0f} | "
                    f"{t_dec / t_copy:.1f} |")
        print(rows[-1], flush=True)
        z = w = None
        torch.cuda.empty_cache()
    return rows


def mlp_rows(spl: int, tokens: int = 4096, d: int = 4096, h: int = 14336) -> list[str]:
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = {k: (torch.randn(*s, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
          for k, s in {"gate": (h, d), "up": (h, d), "down": (d, h)}.items()}
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step(wg, wu, wd):
        y = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
        y.backward(torch.ones_like(y))
        x.grad = None

    t_dense = timed(lambda: step(ws["gate"], ws["up"], ws["down"]))
    zs = {k: NeuZipTensor.from_dense(v, symbols_per_lane=spl) for k, v in ws.items()}
    t_dec = timed(lambda: [z.dequantize() for z in zs.values()])
    rows = [f"| dense | {t_dense * 1e3:.2f} | 1.00 |",
            f"| (3 fused dequantizes alone) | {t_dec * 1e3:.2f} | {t_dec / t_dense:.2f} |"]
    for name, on in (("NeuZip lossless, no prefetch", False), ("NeuZip lossless, side-stream prefetch", True)):
        SETTINGS.neuzip_prefetch = on
        pf.PREFETCH.reset()
        t = timed(lambda: step(zs["gate"], zs["up"], zs["down"]))
        rows.append(f"| {name} | {t * 1e3:.2f} | {t / t_dense:.2f} |")
        print(rows[-1], flush=True)
    SETTINGS.neuzip_prefetch = False  # the library default
    z3 = {k: NeuZipTensor.from_dense(v, 3, symbols_per_lane=spl) for k, v in ws.items()}  # lossy: for comparison only
    t = timed(lambda: step(z3["gate"], z3["up"], z3["down"]))
    rows.append(f"| NeuZip 3-bit mantissa (lossy, not the target row), no prefetch | {t * 1e3:.2f} | {t / t_dense:.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,8,128,512,1024")
    ap.add_argument("--sweep-sizes", default="128,1024")
    ap.add_argument("--spl", default="512,1024,2048", help="symbols per lane tried in the sweep")
    ap.add_argument("--shapes", default="64x2,128x4,256x4,512x4,256x8", help="lanes-per-program x warps; trailing p: with the one-step sign/mantissa prefetch, t: 4-byte decode-table "
                    "entries")
    ap.add_argument("--out", default="experiments/results/neuzip_speed.md")
    a = ap.parse_args()
    outs = [Path(a.out)] + ([Path(os.environ["OUT"], "neuzip_speed.md")] if os.environ.get("OUT") else [])
    t0 = time.time()
    text = [f"# neuzip_speed\n\ndevice: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton "
            f"{triton.__version__}; python {platform.python_version()}\n",
            "GB/s = dense bf16 bytes / time (CUDA events, median of 5 after a warm-up). Weights: N(0, 0.02) in bf16 "
            "(random, not trained: real exponent statistics differ a little). spl = symbols per rANS lane.\n",
            "## Fused decode kernel: launch-shape sweep\n", "| MB | spl | bits/weight | lanes/program | warps | "
            "prefetch | table bytes/entry | dequantize GB/s |", "|---|---|---|---|---|---|---|---|"]

    def flush(extra: list[str]) -> None:
        body = "\n".join(text + extra) + f"\n\n(total benchmark time {time.time() - t0:.0f} s)\n"
        for p in outs:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(body)

    shapes = [parse_shape(s) for s in a.shapes.split(",")]
    rows, (spl, block, warps, pre, t32) = sweep_rows([int(s) for s in a.sweep_sizes.split(",")],
                                                [int(s) for s in a.spl.split(",")], shapes)
    text += rows + [f"\nbest at <= 128 MB: spl={spl}, {block} lanes/program, {warps} warps, prefetch {pre}, "
                    f"{4 if t32 else 8}-byte table entries (used below)\n"]
    flush([])
    set_launch(block, warps, pre)
    ans_triton.DECODE_TABLE32 = t32  # the tables built below take the winner's entry width
    text += ["## Throughput\n", "dequantize = the fused kernel (rANS lanes + sign/mantissa merge, one launch); "
             "unfused = the previous path (rANS kernel, then torch ops for the merge); rANS-only = symbol decode "
             "alone; copy = dense clone (memory-bandwidth peer); x copy = dequantize time / copy time.\n",
             "| MB | spl | bits/weight | dequantize GB/s | unfused GB/s | rANS-only GB/s | compress GB/s | copy GB/s "
             "| x copy |", "|---|---|---|---|---|---|---|---|---|"]
    for r in throughput_rows([int(s) for s in a.sizes.split(",")], spl):
        text.append(r)
        flush([])
    text += ["", "## Llama-3-8B MLP block (4096x14336), 4096 tokens, forward+backward (input grad), bf16\n",
             "| weights | ms | x dense |", "|---|---|---|", *mlp_rows(spl)]
    flush([])
    print("\n".join(text), flush=True)


if __name__ == "__main__":
    main()
