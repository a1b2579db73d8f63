"""Trans-LoRA benchmark on CPU: transfer a LoRA from `tiny_src` (char tokenizer, 3x96) to `small_tgt` (byte-level BPE,
4x160), both pre-trained by the framework's own recipe with numbered-list documents, for each task of the suite.

Per task: source + LoRA, bare target, target + transferred LoRA (filtered synthetic data), and the ablations
unfiltered synthetic data and seeds only; MMD^2 (MiniLM space) of filtered vs unfiltered synthetic inputs to real ones.
Writes experiments/results/translora_bench.md and translora_bench.png; stage artefacts go to --work (resumable).

    OMP_NUM_THREADS=1 python experiments/translora_bench.py [--tasks all] [--seeds 0] [--headline-seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ROWS = [("source + LoRA", "source + LoRA"), ("target", "target"), ("transferred", "target + transferred (filtered)"),
        ("unfiltered-synthetic", "target + transferred (unfiltered)"), ("seeds-only", "target + transferred (seeds)")]

BENCH = [
    "data.n_train=250", "data.n_test=100", "source_lora.steps=150", "discriminator.steps=100", "distill.steps=150",
    "synthesize.n=100", "discriminator.n_synthetic=150", "distill.variants=[filtered,unfiltered,seeds]",
    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger=csv",
]


def run_one(task: str, seed: int, work: Path, extra: list[str]) -> dict:
    from memfit.config import compose
    from memfit.transfer.pipeline import run

    run_dir = work / f"{task}-s{seed}"
    cfg = compose("transfer", [*BENCH, f"task={task}", f"seed={seed}", f"run_dir={run_dir}",
                               f"paths.output_dir={run_dir}", *extra])
    t0 = time.perf_counter()
    res = run(cfg)
    out = json.loads((run_dir / "evaluate" / "results.json").read_text())
    out["synthesize"] = res.get("synthesize", {})
    out["discriminator"] = res.get("discriminator", {})
    out["seconds"] = time.perf_counter() - t0
    # stage compute time as recorded when each stage ran (a resumed run skips stages, so its own wall time is ~0)
    out["stage_seconds"] = sum(float(m.get("seconds", 0.0)) for m in res.values())
    return out


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def write_report(results: dict[str, list[dict]], path: Path, wall: float) -> None:
    head = "| task | seeds | " + " | ".join(r for r, _ in ROWS) + " | MMD² filtered | MMD² unfiltered | disc. held-out acc | acceptance |"
    lines = [
        "# Trans-LoRA transfer: tiny_src (char, 3x96) -> small_tgt (BPE, 4x160)", "",
        f"CPU ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)); this invocation {wall / 60:.1f} min; stage compute recorded in the "
        f"run directories {sum(r['stage_seconds'] for runs in results.values() for r in runs) / 60:.1f} min "
        "(pre-training of the two bases, cached, not included).",
        "Exact-match test accuracy on 100 test examples per task (|D| = 250 real examples for the source LoRA and the "
        "discriminator; 100 synthetic inputs kept for transfer; 5 seeds). MMD² (unbiased, RBF, median bandwidth) "
        "between 100 real test inputs and 100 synthetic inputs in all-MiniLM-L6-v2 space; lower = closer.",
        "", head, "|" + "---|" * (head.count("|") - 1),
    ]
    for task, runs in results.items():
        cells = [fmt([r["accuracy"][key] for r in runs]) for _, key in ROWS]
        mmd = [fmt([r["mmd2"][k] for r in runs]) for k in ("filtered", "unfiltered")]
        disc = fmt([r["discriminator"].get("heldout_acc", float("nan")) for r in runs])
        acc = fmt([r["synthesize"].get("acceptance_rate", float("nan")) for r in runs])
        lines.append(f"| {task} | {len(runs)} | " + " | ".join(cells) + f" | {' | '.join(mmd)} | {disc} | {acc} |")
    def mean(runs: list[dict], key: str) -> float:
        return statistics.mean(r["accuracy"][key] for r in runs)

    informative = {t: runs for t, runs in results.items() if max(mean(runs, k) for _, k in ROWS) > 0}
    wins = [t for t, runs in informative.items() if mean(runs, "target + transferred (filtered)")
            >= max(mean(runs, "source + LoRA"), mean(runs, "target"))]
    closer = [t for t, runs in results.items() if statistics.mean(r["mmd2"]["filtered"] for r in runs)
              < statistics.mean(r["mmd2"]["unfiltered"] for r in runs)]
    lines += ["", f"transferred >= max(source + LoRA, target) on {len(wins)} of {len(informative)} tasks where any "
              f"model scores above 0 ({', '.join(wins) or 'none'}); "
              f"filtered MMD² < unfiltered on {len(closer)} of {len(results)} tasks ({', '.join(closer) or 'none'}).",
              ""]
    path.write_text("\n".join(lines))


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / len(ROWS)
    for i, (label, key) in enumerate(ROWS):
        vals = [statistics.mean(r["accuracy"][key] for r in results[t]) for t in tasks]
        a1.bar([j + i * width for j in range(len(tasks))], vals, width, label=label)
    a1.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], [t.replace("_", "\n") for t in tasks], fontsize=7)
    a1.set_ylabel("test accuracy")
    a1.legend(fontsize=7)
    for i, k in enumerate(("filtered", "unfiltered")):
        vals = [statistics.mean(r["mmd2"][k] for r in results[t]) for t in tasks]
        a2.bar([j + i * 0.4 for j in range(len(tasks))], vals, 0.4, label=k)
    a2.set_xticks([j + 0.2 for j in range(len(tasks))], [t[:8] for t in tasks], fontsize=7, rotation=45)
    a2.set_ylabel("MMD² to real inputs")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["all"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds for every task")
    p.add_argument("--headline-seeds", nargs="*", type=int, default=[],
                   help="extra seeds for --headline-task (the 3-seed headline row)")
    p.add_argument("--headline-task", default="boolean_expressions")
    p.add_argument("--work", default=str(ROOT / ".cache" / "translora_bench"))
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "translora_bench"))
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for conf/transfer.yaml")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from memfit.data.tasks import resolve_tasks

    tasks = resolve_tasks(args.tasks[0] if args.tasks == ["all"] else args.tasks)
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {}
    for task in tasks:
        seeds = sorted(set(args.seeds) | (set(args.headline_seeds) if task == args.headline_task else set()))
        results[task] = [run_one(task, s, Path(args.work), args.overrides) for s in seeds]
        write_report(results, Path(args.out + ".md"), time.perf_counter() - t0)  # partial results survive a crash
    write_report(results, Path(args.out + ".md"), time.perf_counter() - t0)
    plot(results, Path(args.out + ".png"))
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    main()
