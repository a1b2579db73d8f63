"""Human-readable run summaries (the quickstart's before/after table)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    before, after = results.get("before") or {}, results.get("after") or {}
    rows = []
    for key in sorted(set(before) | set(after), key=lambda k: (not k.endswith("/acc"), k)):
        if key.startswith("test/"):
            rows.append((key, _fmt(before.get(key)), _fmt(after.get(key))))
    t, n = results.get("trainable_params", 0), results.get("total_params", 0)
    rows.append(("trainable parameters", "", f"{t:,} of {n:,} ({100 * t / max(n, 1):.2f}%)"))
    perf = results.get("perf") or {}
    if "tokens_per_s" in perf:
        rows.append(("train tokens/s", "", f"{perf['tokens_per_s']:,.0f}"))
    if "peak_mem_gib" in perf:
        rows.append(("peak memory (GiB)", "", f"{perf['peak_mem_gib']:.2f}"))
    if "mfu" in perf:
        rows.append(("MFU", "", f"{100 * perf['mfu']:.1f}%"))
    rows.append(("wall time (s)", "", f"{results.get('seconds', 0):.1f}"))
    return rows


def accuracy_meaning(data_cfg: Any) -> str:
    """What test/acc measures for a data config: the generated split is not the real benchmark's items."""
    if data_cfg is None:
        return "test/acc = greedy exact match on the test split"
    if data_cfg.get("test_file"):
        return f"test/acc = greedy exact match on data.test_file={data_cfg.get('test_file')}"
    if "n_test" in data_cfg:
        return (f"test/acc = greedy exact match on the generated test split ({data_cfg.get('n_test')} items per task "
                "in the BBH format, not the real BBH items)")
    return "test/acc = greedy exact match on the test split"


def print_summary(results: dict[str, Any]) -> None:
    cfg = results.get("config")
    title = "run summary"
    if cfg is not None:
        title = f"model={cfg.model.get('name', '?')} adapter={cfg.adapter.get('name', '?')} " \
                f"storage={cfg.storage.get('name', '?')} loss={cfg.loss.get('name', '?')}"
    caption = accuracy_meaning(cfg.get("data") if cfg is not None else None) if results.get("after") or \
        results.get("before") else None
    table = Table(title=title, caption=caption)
    table.add_column("metric")
    table.add_column("base (before)", justify="right")
    table.add_column("tuned (after)", justify="right")
    for row in summary_rows(results):
        table.add_row(*row)
    Console(width=110).print(table)


def print_evaluation(metrics: dict[str, float], predictions: list[dict[str, Any]], title: str) -> None:
    """`python -m memfit.cli.evaluate`'s table: items and greedy exact match per task, overall accuracy and loss."""
    table = Table(title=title, caption="acc = greedy exact match of the first generated line with the target",
                  min_width=min(110, len(title) + 4))
    table.add_column("task")
    table.add_column("items", justify="right")
    table.add_column("acc", justify="right")
    tasks = list(dict.fromkeys(p["task"] for p in predictions))
    for task in tasks:
        rows = [p for p in predictions if p["task"] == task]
        table.add_row(task, f"{len(rows):,}", _fmt(sum(p["correct"] for p in rows) / len(rows)))
    table.add_row("all", f"{len(predictions):,}", _fmt(metrics.get("test/acc")))
    table.add_row("test/loss", "", _fmt(metrics.get("test/loss")))
    Console(width=110).print(table)
