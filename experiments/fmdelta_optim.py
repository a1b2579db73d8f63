"""Checkpoint sizes of `callbacks=fmdelta`: FM-Delta weights + optimizer state stored raw or with a generic codec.

One full fine-tuning run of the pre-trained tiny model (memfit.train.run, callbacks=fmdelta, AdamW) writes a
checkpoint; it is decoded with `load_fmdelta_checkpoint` and re-encoded by `FMDeltaCheckpoint.encode` (the callback's
own save path) once per optimizer codec, timing each encode and checking that decode restores the optimizer state bit
for bit. Sizes are the callback's `sizes` (tensor bytes raw vs stored). Writes experiments/results/fmdelta_optim.md.
Usage: FMDELTA_TINY_BASE=DIR python experiments/fmdelta_optim.py [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from memfit.callbacks.fmdelta import FMDeltaCheckpoint, load_fmdelta_checkpoint
from memfit.compression.fmdelta_records import state_fingerprint

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "experiments" / "results"
CACHE = Path(os.environ.get("MEMFIT_CACHE", ROOT / ".cache" / "memfit")).resolve()
CODECS: list[tuple[str, int | None]] = [("none", None), ("zlib", 6), ("zstd", 3), ("zstd", 19), ("lzma", 6)]


def train_checkpoint(steps: int) -> tuple[Path, Any]:
    from memfit.config import compose
    from memfit.train import run

    base_path = os.environ.get("FMDELTA_TINY_BASE")
    model = ["model=llama", f"model.path={base_path}", "model.dtype=float32"] if base_path else []
    out = CACHE / "fmdelta_optim" / f"run{steps}"
    cfg = compose("train", ["experiment=quickstart", *model, "callbacks=fmdelta", "logger=none", "eval.before=false",
                            "eval.test=false", "print_summary=false", f"trainer.max_steps={steps}",
                            f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=1",
                            "trainer.enable_progress_bar=false", "~callbacks.progress", "~callbacks.lr_monitor",
                            "callbacks.model_checkpoint.save_last=false", "callbacks.model_checkpoint.save_top_k=-1",
                            "optim.lr=1e-4", "optim.weight_decay=0.0", "scheduler.warmup_steps=0",
                            "scheduler.min_ratio=1.0", "eval.generate_batches=0", f"paths.cache_dir={CACHE}",
                            f"paths.output_dir={out}"])
    ckpts = sorted((out / "checkpoints").glob("*.ckpt")) if out.exists() else []
    if not ckpts:
        run(cfg)
        ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    return ckpts[-1], cfg


def same(a: Any, b: Any) -> bool:
    """Bit-exact equality of nested optimizer states."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()
    from memfit.models.build import build_model

    ckpt_file, cfg = train_checkpoint(a.steps)
    model, _ = build_model(cfg.model, CACHE)
    base = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = load_fmdelta_checkpoint(ckpt_file, base)
    rows = []
    for codec, level in CODECS:
        cb = FMDeltaCheckpoint(optimizer_codec=codec, optimizer_level=level)
        cb.base, cb.base_fp = base, state_fingerprint(base)
        t0 = time.perf_counter()
        packed = cb.encode(ckpt)
        t1 = time.perf_counter()
        back = cb.decode(dict(packed))
        t2 = time.perf_counter()
        ok = same(back["optimizer_states"], ckpt["optimizer_states"]) and same(back["state_dict"], ckpt["state_dict"])
        s = cb.sizes
        rows.append((f"{codec}" + (f"-{level}" if level is not None else ""), s, t1 - t0, t2 - t1, ok))
        print(rows[-1], flush=True)
    raw_w, raw_o = rows[0][1]["state_dict_raw"], rows[0][1]["optimizer_raw"]
    lines = ["# callbacks=fmdelta checkpoint sizes: FM-Delta weights + optimizer state (generic codecs)", "",
             f"`experiments/fmdelta_optim.py --steps {a.steps}`: the pre-trained tiny Llama "
             f"(`{os.path.relpath(os.environ['FMDELTA_TINY_BASE'], ROOT) if 'FMDELTA_TINY_BASE' in os.environ else 'model=tiny'}`) fully fine-tuned {a.steps} steps (quickstart "
             "task, AdamW lr 1e-4 constant), checkpoint re-encoded by `FMDeltaCheckpoint.encode` per codec. "
             f"CPU {platform.machine()}, {os.cpu_count()} cores (shared; load average "
             f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}), torch {torch.__version__}.", "",
             f"Raw tensor bytes: weights {raw_w / 1e6:.2f} MB, optimizer state (AdamW exp_avg + exp_avg_sq + step) "
             f"{raw_o / 1e6:.2f} MB.", "",
             "| optimizer codec | weights stored (FM-Delta) | weights ratio | optimizer stored | optimizer ratio | "
             "checkpoint tensors stored / raw | encode s | decode s | bit-exact |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s, te, td, ok in rows:
        opt = s.get("optimizer_stored", s["optimizer_raw"])
        lines.append(f"| {name} | {s['state_dict_stored'] / 1e6:.3f} MB | {s['state_dict_stored'] / raw_w:.3f} | "
                     f"{opt / 1e6:.3f} MB | {opt / raw_o:.3f} | {(s['state_dict_stored'] + opt) / (raw_w + raw_o):.3f}"
                     f" | {te:.2f} | {td:.2f} | {ok} |")
    lines += ["", "optimizer 'none' = the tensors as torch.save stores them (ratio 1 by definition); the other rows "
              "torch.save the optimizer state and compress the bytes (ratio vs the raw tensor bytes, so it includes "
              "the small pickle overhead).", ""]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fmdelta_optim.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
