"""FM-Delta throughput: compress / decompress MB/s of a ~1 GB fine-tuned model against its base, CPU or GPU.

The pair is synthetic but shaped like an Adam fine-tune: base weights ~ N(0, 0.02^2) in 16 tensors of 16M elements
(1 GiB fp32), fine-tuned = base + lr * sign(noise) on 90% of the weights (lr 2e-5). Same inputs, same process: the
FM-Delta codec (native multi-core C++ on CPU, Triton symbolise/pack kernels + Triton rANS on GPU), the torch reference path (CPU, on a slice),
and zstd-3 of base XOR fine-tuned as the generic peer (CPU). MB/s = raw fine-tuned bytes / wall time. Anchor (methods
.md): the reference C++ core, single-threaded, ~110 MB/s encode, ~75 MB/s decode. Targets: >= 300 MB/s on 2 CPU cores,
>= 5 GB/s on GPU. Writes experiments/results/fmdelta_speed_<device>.md.
Usage: python experiments/fmdelta_speed.py [--device cpu|cuda] [--tensors 16] [--numel 16777216] [--dtype fp32]
       [--reserve] [--profile] [--spl 256,512] [--threads 1,0] [--tag NAME]
--threads (cpu): the native codec at each of these torch thread counts (0 = torch's default, i.e. all cores), to show
that more threads are never slower than one; --tag names the result file (fmdelta_speed_cpu_<tag>.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from memfit.kernels.cpu import usable_cores
from memfit.kernels.fmdelta import decode_delta, encode_delta

OUT = Path(os.environ.get("FMDELTA_OUT", Path(__file__).resolve().parent / "results"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pair(n_tensors: int, numel: int, dtype: torch.dtype, device: str) -> tuple[list, list]:
    g = torch.Generator(device=device).manual_seed(0)
    base, ft = [], []
    for _ in range(n_tensors):
        b = (0.02 * torch.randn(numel, generator=g, device=device)).to(dtype)
        step = 2e-5 * torch.randn(numel, generator=g, device=device).sign()
        step *= torch.rand(numel, generator=g, device=device) < 0.9
        base.append(b)
        ft.append((b.float() + step).to(dtype))
    return base, ft


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _faults() -> int:
    """Minor page faults of this process so far (first touches of fresh host memory)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _reserved(device: str) -> int:
    return torch.cuda.memory_reserved() if device == "cuda" else 0


def time_codec(base: list, ft: list, device: str, spl: int | None = None) -> dict[str, float]:
    raw = sum(t.numel() * t.element_size() for t in ft)
    flt0, res0 = _faults(), _reserved(device)
    # warm-up on a whole tensor: compiles the kernels and lets the allocator reach its steady state
    m, p = encode_delta(base[0], ft[0], symbols_per_lane=spl)
    decode_delta(base[0], m, b"".join(p))
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    enc = []
    for b, f in zip(base, ft):
        enc.append(encode_delta(b, f, symbols_per_lane=spl))
        if os.environ.get("FMDELTA_VERBOSE") == "1":  # per-tensor wall times: is a slow pass slow everywhere?
            sync(device)
            print(f"encode tensor {len(enc)}: {time.perf_counter() - t0:.4f} s cumulative", flush=True)
    sync(device)
    t1, c1 = time.perf_counter(), time.process_time()
    blobs = [b"".join(p) for _, p in enc]
    t2, c2 = time.perf_counter(), time.process_time()
    outs = []
    for b, (m, _), blob in zip(base, enc, blobs):
        outs.append(decode_delta(b, m, blob))
        if os.environ.get("FMDELTA_VERBOSE") == "1":
            sync(device)
            print(f"decode tensor {len(outs)}: {time.perf_counter() - t2:.4f} s cumulative", flush=True)
    sync(device)
    t3, c3 = time.perf_counter(), time.process_time()
    ok = all(torch.equal(o.view(torch.uint8), f.view(torch.uint8)) for o, f in zip(outs, ft))
    stored = sum(map(len, blobs))
    return {"raw_MB": raw / 1e6, "ratio": stored / raw, "enc_MBps": raw / (t1 - t0) / 1e6,
            "dec_MBps": raw / (t3 - t2) / 1e6, "bit_exact": ok, "faults_MB": (_faults() - flt0) * 4096 / 1e6,
            "reserved_MB": (_reserved(device) - res0) / 1e6,
            "enc_cpu_MBps": raw / max(c1 - c0, 1e-9) / 1e6, "dec_cpu_MBps": raw / max(c3 - c2, 1e-9) / 1e6}


def time_reference(base: list, ft: list) -> dict[str, float]:
    """The pure-torch path (what runs without a compiler) on one tensor."""
    from memfit.kernels import native
    from memfit.kernels.fmdelta import native as fmdelta_native
    from memfit.kernels.settings import SETTINGS

    SETTINGS.native = False
    fmdelta_native.library.cache_clear()
    native.load.cache_clear()
    try:
        return time_codec(base[:1], ft[:1], "cpu")
    finally:
        SETTINGS.native = True
        fmdelta_native.library.cache_clear()
        native.load.cache_clear()


def time_zstd(base: list, ft: list, level: int = 3) -> dict[str, float]:
    import zstandard

    it = {1: torch.int8, 2: torch.int16, 4: torch.int32}[ft[0].element_size()]
    xs = [(f.view(it) ^ b.view(it)).numpy().tobytes() for b, f in zip(base, ft)]
    raw = sum(map(len, xs))
    c = zstandard.ZstdCompressor(level=level, threads=torch.get_num_threads())
    t0, c0 = time.perf_counter(), time.process_time()
    zs = [c.compress(x) for x in xs]
    t1, c1 = time.perf_counter(), time.process_time()
    d = zstandard.ZstdDecompressor()
    for z in zs:
        d.decompress(z)
    t2, c2 = time.perf_counter(), time.process_time()
    return {"raw_MB": raw / 1e6, "ratio": sum(map(len, zs)) / raw, "enc_MBps": raw / (t1 - t0) / 1e6,
            "dec_MBps": raw / (t2 - t1) / 1e6, "bit_exact": True, "faults_MB": float("nan"), "reserved_MB": 0.0,
            "enc_cpu_MBps": raw / max(c1 - c0, 1e-9) / 1e6, "dec_cpu_MBps": raw / max(c2 - c1, 1e-9) / 1e6}


def profile(base: torch.Tensor, ft: torch.Tensor) -> None:
    """Where one tensor's encode + decode spends its time (CUDA kernels and host), printed."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    meta, parts = encode_delta(base, ft)
    blob = b"".join(parts)
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        meta, parts = encode_delta(base, ft)
        blob = b"".join(parts)
        torch.cuda.synchronize()
        decode_delta(base, meta, blob)
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    print(p.key_averages().table(sort_by="cpu_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--spl", default="", help="cuda: comma-separated rANS symbols per lane to compare (default: "
                    "the codec's)")
    ap.add_argument("--profile", action="store_true", help="cuda: print the kernel time table of one tensor")
    ap.add_argument("--threads", default="", help="cpu: comma-separated torch thread counts to time the native "
                    "codec at (0 = the default); default: the current setting only")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--reserve", action="store_true", help="cuda: before the first pass, reserve (allocate and free) "
                    "3x the model's bytes in torch's caching allocator, to tell the first pass's device allocations "
                    "apart from the codec")
    a = ap.parse_args()
    load0 = os.getloadavg()
    base, ft = pair(a.tensors, a.numel, DTYPES[a.dtype], a.device)
    if a.reserve and a.device == "cuda":
        del_me = torch.empty(3 * sum(t.numel() * t.element_size() for t in ft), dtype=torch.uint8, device="cuda")
        del del_me  # the caching allocator keeps the segment: the passes below split it instead of calling cudaMalloc
    name = "FM-Delta (" + (f"native C++, {torch.get_num_threads()} threads" if a.device == "cpu"
                           else "Triton kernels + Triton rANS") + ")"
    first = ", first pass in the process" + (" (device memory reserved beforehand)" if a.reserve else "")
    default_threads = torch.get_num_threads()
    if a.device == "cpu" and a.threads:
        rows = {}
        for n in [int(x) for x in a.threads.split(",")]:
            torch.set_num_threads(n or default_threads)
            rows[f"FM-Delta (native C++, torch threads {n or default_threads}{'' if n else ' = default'})"] = \
                time_codec(base, ft, "cpu")
        torch.set_num_threads(default_threads)
    else:
        rows = {name + (first if a.device == "cuda" else ""): time_codec(base, ft, a.device)}
    if a.device == "cuda":  # the first pass of a fresh process is slower (see the note in the output)
        rows[name + ", second pass"] = time_codec(base, ft, a.device)
    if a.device == "cpu":
        rows["FM-Delta torch reference path (1 tensor)"] = time_reference(base, ft)
        rows["zstd-3 of base XOR ft (peer)"] = time_zstd(base, ft)
    else:
        for spl in [int(x) for x in a.spl.split(",") if x]:
            rows[f"FM-Delta (Triton), {spl} symbols per lane"] = time_codec(base, ft, "cuda", spl)
        rows["FM-Delta (Triton), bf16 pair"] = time_codec(*pair(a.tensors, a.numel, torch.bfloat16, "cuda"),
                                                                   "cuda")
        if a.profile:
            profile(base[0], ft[0])
    dev = torch.cuda.get_device_name() if a.device == "cuda" else (platform.processor() or platform.machine())
    import triton

    try:
        import zstandard

        zv = zstandard.__version__
    except ImportError:
        zv = "n/a"
    load1 = os.getloadavg()
    target = 5000 if a.device == "cuda" else 300
    lines = [f"# FM-Delta throughput on {a.device} ({dev})", "",
             f"torch {torch.__version__}, triton {triton.__version__}, zstandard {zv}, threads "
             f"{torch.get_num_threads()}, cores {os.cpu_count()} (usable {usable_cores()}); THP_MEM_ALLOC_ENABLE="
             f"{os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')} (torch's huge-page CPU allocations); pair: {a.tensors} x "
             f"{a.numel} {a.dtype} "
             "(synthetic Adam-like fine-tune, see script docstring). Target: >= "
             f"{target} MB/s; anchor: reference C++ core 110 MB/s encode / 75 MB/s decode (1 thread).",
             f"Load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in load0)}, after: "
             f"{' '.join(f'{x:.2f}' for x in load1)}" + (" - the CPU is shared with other jobs, so wall-clock MB/s "
             "is what this process got, not what free cores give; 'MB per CPU-s' = raw bytes / CPU seconds of "
             "this process (all its threads), i.e. the per-core throughput independent of the contention." if
             a.device == "cpu" else "."), "",
             "| codec | raw MB | ratio | compress MB/s | decompress MB/s | vs anchor enc/dec | compress MB per CPU-s |"
             " decompress MB per CPU-s | host MB first-touched | device MB newly reserved | bit-exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['raw_MB']:.0f} | {r['ratio']:.3f} | {r['enc_MBps']:.0f} | {r['dec_MBps']:.0f} | "
                     f"{r['enc_MBps'] / 110:.2f}x / {r['dec_MBps'] / 75:.2f}x | {r['enc_cpu_MBps']:.0f} | "
                     f"{r['dec_cpu_MBps']:.0f} | {r['faults_MB']:.0f} | {r['reserved_MB']:.0f} | {r['bit_exact']} |")
    OUT.mkdir(parents=True, exist_ok=True)
    lines += ["", "host MB first-touched = minor page faults during the row x 4 KiB (fresh host memory the pass "
              "wrote); device MB newly reserved = growth of torch's CUDA caching allocator (cudaMalloc) during the "
              "row, warm-up included."]
    suffix = ("_reserved" if a.reserve and a.device == "cuda" else "") + (
        "_thp" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "") + (f"_{a.tag}" if a.tag else "")
    (OUT / f"fmdelta_speed_{a.device}{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
