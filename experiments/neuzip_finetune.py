"""Full fine-tuning with the trained Linear weights kept NeuZip-compressed (storage.train_compressed): the quickstart
run (pre-trained tiny Llama, boolean_expressions) with dense weights, with lossless NeuZip weights and with 3-bit NeuZip
weights, same seed, data and optimizer: loss curves, test accuracy, the bytes the Linear weights occupy between steps
and step time. Writes experiments/results/neuzip_finetune.{md,png,json}.

    python experiments/neuzip_finetune.py [--optim adamw|sgd] [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "experiments" / "results"
CACHE = Path(os.environ.get("MEMFIT_CACHE", ROOT / ".cache" / "memfit")).resolve()
VARIANTS = {
    "dense": ["storage=dense"],
    "NeuZip lossless": ["storage=neuzip", "storage.train_compressed=true"],
    "NeuZip 3-bit": ["storage=neuzip_lossy", "storage.mantissa_bits=3", "storage.train_compressed=true"],
}


class Probe(L.Callback):
    """Per-step loss, and at the end the bytes of the Linear weights of the decoder blocks (compressed or dense)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.weight_bytes = self.dense_bytes = self.state_bytes = 0
        self.tokens, self.t0, self.seconds = 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 2:  # the first steps warm up (allocations, codec tables)
            self.t0, self.tokens = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.tokens += int(batch["input_ids"].numel())
        self.seconds = time.perf_counter() - self.t0

    def on_train_end(self, trainer, pl_module) -> None:
        from memfit.quant import NeuZipTensor

        opt_state = trainer.optimizers[0].state
        for name, mod in pl_module.model.named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
                self.dense_bytes += w.numel() * w.element_size()
                self.weight_bytes += w.compressed_nbytes if isinstance(w, NeuZipTensor) else w.numel() * w.element_size()
                self.state_bytes += sum(v.numel() * v.element_size() for v in opt_state.get(w, {}).values()
                                        if torch.is_tensor(v) and v.dim() > 0)
        opt = next((c.inner for c in trainer.callbacks if type(c).__name__ == "CompressedTraining"), None)
        if opt is not None:
            self.state_bytes += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                                   if torch.is_tensor(v))


def one(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    import memfit.train as train
    from memfit.config import compose

    probe = Probe()
    cfg = compose("train", ["experiment=quickstart", *overrides, f"optim={args.optim}", f"optim.lr={args.lr}",
                            "trainer.gradient_clip_val=null", f"trainer.max_steps={args.steps}",
                            f"trainer.val_check_interval={args.steps}", "trainer.enable_progress_bar=false", "~callbacks.progress", "~callbacks.lr_monitor",
                            "trainer.enable_model_summary=false", "logger=none", "eval.before=false",
                            "print_summary=false", f"paths.cache_dir={CACHE}",
                            f"paths.output_dir={CACHE / 'neuzip_finetune' / name.replace(' ', '_')}"])
    res = train.run(cfg, callbacks=[probe])
    return {"losses": probe.losses, "acc": res["after"]["test/acc"], "test_loss": res["after"]["test/loss"],
            "tokens_per_s": probe.tokens / probe.seconds if probe.seconds else None, "weight_bytes": probe.weight_bytes,
            "dense_bytes": probe.dense_bytes, "state_bytes": probe.state_bytes}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, r), style in zip(results.items(), ("-", "--", ":")):
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], style, label=f"{name} (test acc {r['acc']:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.set_title("Full fine-tuning, trained weights dense vs NeuZip-compressed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optim", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = {name: one(name, ov, args) for name, ov in VARIANTS.items()}
    dense = results["dense"]
    lines = ["# NeuZip: full fine-tuning with compressed trained weights", "",
             f"`python experiments/neuzip_finetune.py --optim {args.optim} --lr {args.lr:g} --steps {args.steps}`: "
             f"the quickstart (pre-trained tiny Llama, task boolean_expressions, fp32, {args.steps} steps, "
             f"{args.optim} lr {args.lr:g} with the warm-up + cosine schedule, no clipping), same seed and data. "
             f"CPU {platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}.",
             "'Linear weights' = the decoder blocks' Linear weights between steps (every NeuZip stream, table and "
             "header counted; the embeddings, norms and untied head stay dense and train with Lightning's "
             "optimizer). 'update state' = the in-backward optimizer's tensors (AdamW moments, fp32).", "",
             "| weights | Linear weights KB | x dense | optimizer state KB | first-10 loss | last-10 loss | max abs loss "
             "diff vs dense | test loss | test acc | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        diff = max(abs(a - b) for a, b in zip(r["losses"], dense["losses"]))
        first, last = sum(r["losses"][:10]) / 10, sum(r["losses"][-10:]) / 10
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        lines.append(f"| {name} | {r['weight_bytes'] / 1e3:.1f} | {r['weight_bytes'] / r['dense_bytes']:.3f} | "
                     f"{r['state_bytes'] / 1e3:.1f} | {first:.4f} | {last:.4f} | {diff:.2e} | {r['test_loss']:.4f} | "
                     f"{r['acc']:.3f} | {tps} |")
    lines += ["", "![loss curves](neuzip_finetune.png)", ""]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "neuzip_finetune.json").write_text(json.dumps({"args": vars(args), "results": results}))
    plot(results, OUT / "neuzip_finetune.png")
    (OUT / "neuzip_finetune.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
