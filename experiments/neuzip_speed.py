"""NeuZip GPU speed: decompression / compression throughput (GB/s of dense bf16) from 1 MB to 1 GB, against a dense
copy of the same tensor (the memory-bandwidth peer) in the same process, and forward+backward of a Llama-3-8B-shaped
MLP block (4096 -> 14336 -> 4096, 4096 tokens) with dense vs NeuZip frozen weights. Writes a markdown table."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from framework.quant.neuzip import NeuZipTensor
from kernels.ans import ans_decode


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


def throughput_rows(sizes_mb: list[int], spl_values: list[int]) -> list[str]:
    rows = []
    for mb in sizes_mb:
        n = mb * (1 << 20) // 2
        cols = 4096 if n >= 4096 * 64 else 256
        w = (torch.randn(n // cols, cols, device="cuda") * 0.02).to(torch.bfloat16)
        nbytes = w.numel() * 2
        t_copy = timed(lambda w=w: w.clone())
        for spl in spl_values:
            t_comp = timed(lambda w=w, spl=spl: NeuZipTensor.from_dense(w, symbols_per_lane=spl), reps=2)
            z = NeuZipTensor.from_dense(w, symbols_per_lane=spl)
            assert torch.equal(z.dequantize().view(torch.int16), w.view(torch.int16))
            t_dec = timed(lambda z=z: z.dequantize())
            t_ans = timed(lambda z=z: ans_decode(z.enc, validate=False))
            bits = 8 * z.compressed_nbytes / w.numel()
            rows.append(f"| {mb} | {spl} | {bits:.3f} | {nbytes / t_dec / 1e9:.1f} | {nbytes / t_ans / 1e9:.1f} | "
                        f"{nbytes / t_comp / 1e9:.2f} | {nbytes / t_copy / 1e9:.0f} | {t_dec / t_copy:.1f} |")
            print(rows[-1], flush=True)
            z = None
        w = None
        torch.cuda.empty_cache()
    return rows


def mlp_rows(tokens: int = 4096, d: int = 4096, h: int = 14336) -> list[str]:
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = {k: (torch.randn(*s, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
          for k, s in {"gate": (h, d), "up": (h, d), "down": (d, h)}.items()}
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step(wg, wu, wd):
        y = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
        y.backward(torch.ones_like(y))
        x.grad = None

    t_dense = timed(lambda: step(ws["gate"], ws["up"], ws["down"]))
    zs = {k: NeuZipTensor.from_dense(v) for k, v in ws.items()}
    t_nz = timed(lambda: step(zs["gate"], zs["up"], zs["down"]))
    return [f"| dense | {t_dense * 1e3:.2f} | 1.00 |", f"| NeuZip lossless | {t_nz * 1e3:.2f} | {t_nz / t_dense:.2f} |"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,8,128,512,1024")
    ap.add_argument("--spl", default="512,2048")
    ap.add_argument("--out", default="experiments/results/neuzip_speed.md")
    a = ap.parse_args()
    head = [f"# neuzip_speed\n\ndevice: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton "
            f"{triton.__version__}; python {platform.python_version()}\n",
            "GB/s = dense bf16 bytes / time (CUDA events, median). spl = symbols per rANS lane. dequantize = rANS "
            "decode + sign/mantissa merge (unfused torch ops); 'copy' = dense clone of the same tensor (peer: memory "
            "bandwidth). x copy = dequantize time / copy time.\n",
            "| MB | spl | bits/weight | dequantize GB/s | rANS-only GB/s | compress GB/s | copy GB/s | x copy |",
            "|---|---|---|---|---|---|---|---|"]
    rows = throughput_rows([int(s) for s in a.sizes.split(",")], [int(s) for s in a.spl.split(",")])
    mlp = ["", "Llama-3-8B MLP block (4096x14336), 4096 tokens, forward+backward (input grad), bf16:", "",
           "| weights | ms | x dense |", "|---|---|---|", *mlp_rows()]
    text = "\n".join(head + rows + mlp) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "neuzip_speed.md").write_text(text)


if __name__ == "__main__":
    main()
