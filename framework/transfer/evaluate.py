"""Evaluation (Trans-LoRA step 5): exact-match accuracy of each model on the task's test split, MMD of the synthetic
inputs to real ones in MiniLM space, a markdown table and a PCA plot of the embeddings."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from memfit.data.collate import format_prompt
from memfit.module import first_line
from memfit.transfer.generate import generate_texts
from memfit.transfer.mmd import mmd2, pca_2d

log = logging.getLogger(__name__)


def task_accuracy(model: Any, tok: Any, examples: Sequence[dict[str, str]], batch_size: int = 50,
                  desc: str = "evaluate") -> tuple[float, list[dict[str, str]]]:
    """Greedy answers (first line) against the targets: (accuracy, predictions)."""
    if not examples:
        raise ValueError("no test examples to evaluate")
    max_new = max(len(tok.encode(" " + e["target"], add_special_tokens=False)) for e in examples) + 2
    texts = generate_texts(model, tok, [format_prompt(e["input"]) for e in examples], max_new, batch_size, stop="\n",
                           desc=desc)
    preds = [{"input": e["input"], "target": e["target"], "prediction": first_line(t)} for e, t in zip(examples, texts)]
    return sum(p["prediction"] == p["target"].strip() for p in preds) / len(preds), preds


def mmd_report(real: torch.Tensor, sets: dict[str, torch.Tensor]) -> dict[str, float]:
    """MMD^2 of each synthetic set to the real one, all with one bandwidth (median heuristic over every point) so the
    numbers are comparable."""
    from memfit.transfer.mmd import median_bandwidth

    sigma = median_bandwidth(real, *sets.values())
    return {name: mmd2(real, z, "rbf", sigma) for name, z in sets.items()} | {"sigma": sigma}


def plot_embeddings(sets: dict[str, torch.Tensor], path: Path, title: str) -> None:
    """PCA (2-D) scatter of real and synthetic sentence embeddings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sets)
    xy = pca_2d(torch.cat([sets[n] for n in names])).numpy()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    start = 0
    for n in names:
        k = len(sets[n])
        ax.scatter(xy[start:start + k, 0], xy[start:start + k, 1], s=10, alpha=0.6, label=f"{n} ({k})")
        start += k
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(task: str, acc: dict[str, float], mmd: dict[str, float] | None) -> str:
    lines = [f"### {task}", "", "| model | test acc |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in acc.items()]
    if mmd:
        lines += ["", f"MMD^2 to real inputs (RBF, sigma={mmd['sigma']:.3f}): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in mmd.items() if k not in ("sigma", "n"))]
    return "\n".join(lines) + "\n"
