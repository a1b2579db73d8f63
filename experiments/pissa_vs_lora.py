"""PiSSA vs LoRA (and, with --quantized, QLoRA vs LoftQ vs QPiSSA on storage=nf4) on the framework's pre-trained tiny
base: same task, rank, alpha, lr, steps and seeds; training-loss and gradient-norm curves (PNG) and a test-accuracy
table (markdown).

    python experiments/pissa_vs_lora.py                 # -> experiments/results/pissa_vs_lora.{md,png}
    python experiments/pissa_vs_lora.py --quantized     # -> experiments/results/qpissa_vs_qlora.{md,png}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import lightning as L
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Recorder(L.Callback):
    """Training loss and the global norm of the trainable gradients, per optimizer step."""

    def __init__(self) -> None:
        self.loss: list[float] = []
        self.grad: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.detach().float().norm() for p in pl_module.parameters() if p.grad is not None]
        self.grad.append(float(torch.stack(grads).norm()) if grads else float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss.append(float(outputs["loss"]))


def one_run(method: str, storage: str, seed: int, args: argparse.Namespace, out_dir: str) -> dict:
    import memfit.train as train
    from memfit.config import compose

    rec = Recorder()
    cfg = compose("train", [
        f"adapter={method}", f"storage={storage}", f"seed={seed}", f"adapter.rank={args.rank}",
        f"adapter.alpha={args.rank}", f"optim.lr={args.lr}", f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps}", f"data.tasks={args.task}", f"data.n_test={args.n_test}",
        "data.n_val=16", "logger=none", "callbacks=none", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.accelerator=cpu", "eval.before=false", "print_summary=false",
        "trainer.log_every_n_steps=1", f"paths.output_dir={out_dir}/{method}-{storage}-{seed}", *args.override,
    ])
    res = train.run(cfg, callbacks=[rec])
    return {"loss": rec.loss, "grad": rec.grad, "acc": res["after"]["test/acc"], "test_loss": res["after"]["test/loss"],
            "trainable": res["trainable_params"], "before": (res.get("before") or {}).get("test/acc")}


def smooth(x: list[float], k: int = 5) -> list[float]:
    return [statistics.fmean(x[max(0, i - k + 1): i + 1]) for i in range(len(x))]


def plot(results: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, runs) in enumerate(results.items()):
        color = f"C{i}"
        for j, r in enumerate(runs):
            a1.plot(smooth(r["loss"]), color=color, alpha=0.8, label=label if j == 0 else None)
            a2.plot(smooth(r["grad"]), color=color, alpha=0.8, label=label if j == 0 else None)
    a1.set(xlabel="step", ylabel="training loss (5-step mean)", yscale="log", title=title)
    a2.set(xlabel="step", ylabel="grad norm of trainable params (5-step mean)", yscale="log")
    a1.legend()
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: dict[str, list[dict]], args: argparse.Namespace, title: str, png: str) -> str:
    import transformers

    lines = [f"# {title}", "",
             f"CPU ({os.cpu_count()} cores), torch {torch.__version__}, transformers {transformers.__version__}. "
             f"Pre-trained tiny Llama base (framework recipe `pretrain_tiny`), task `{args.task}`, rank {args.rank}, "
             f"alpha = rank, AdamW lr {args.lr} (warm-up + cosine), {args.steps} steps, batch 32, seeds {args.seeds}; "
             f"test set {args.n_test} questions scored by greedy generation (exact match).", "",
             f"Curves: `{png}`", "",
             "| method | trainable params | loss, first 10 steps | loss, last 10 steps | test loss | test acc (mean ± sd) | per seed |",
             "|---|---|---|---|---|---|---|"]
    for label, runs in results.items():
        first = statistics.fmean(statistics.fmean(r["loss"][:10]) for r in runs)
        last = statistics.fmean(statistics.fmean(r["loss"][-10:]) for r in runs)
        accs = [r["acc"] for r in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        tl = statistics.fmean(r["test_loss"] for r in runs)
        lines.append(f"| {label} | {runs[0]['trainable']} | {first:.4f} | {last:.4f} | {tl:.4f} | "
                     f"{statistics.fmean(accs):.3f} ± {sd:.3f} | {', '.join(f'{a:.3f}' for a in accs)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantized", action="store_true", help="storage=nf4: QLoRA vs LoftQ vs QPiSSA")
    ap.add_argument("--task", default="boolean_expressions")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None)
    ap.add_argument("--override", nargs="*", default=[], help="extra config overrides for every run (e.g. smoke tests)")
    args = ap.parse_args()
    name = "qpissa_vs_qlora" if args.quantized else "pissa_vs_lora"
    out = Path(args.out or f"experiments/results/{name}.md")
    methods = ({"QLoRA": ("lora", "nf4"), "LoftQ (T=5)": ("loftq", "nf4"), "QPiSSA (T=5)": ("pissa", "nf4")}
               if args.quantized else {"LoRA": ("lora", "dense"), "PiSSA": ("pissa", "dense")})
    results: dict[str, list[dict]] = {k: [] for k in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for label, (method, storage) in methods.items():
                results[label].append(one_run(method, storage, seed, args, tmp))
                print(f"{label} seed {seed}: acc {results[label][-1]['acc']:.3f}", flush=True)
    title = "QLoRA vs LoftQ vs QPiSSA (NF4 base)" if args.quantized else "PiSSA vs LoRA"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}))  # raw curves
    png = out.with_suffix(".png")
    plot(results, png, title)
    text = table(results, args, title, str(png))
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
