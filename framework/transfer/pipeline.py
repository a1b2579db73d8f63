"""The Trans-LoRA pipeline as resumable stages: each writes its artefact directory into the run directory (atomically:
built under `<name>.tmp`, then renamed) and is skipped when that directory exists, so a crashed run resumes where it
stopped and `stages=[...]` runs a subset.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from memfit.config import check_choice
from memfit.data.tasks import TASKS, generate_split, resolve_tasks
from memfit.transfer import stages as S
from memfit.transfer.context import STAGES, VARIANTS, Context

log = logging.getLogger(__name__)

def validate(cfg: DictConfig) -> None:
    """Fail at start on unknown stages/variants, a bad task name, or missing mandatory values."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"mandatory config value(s) not set: {', '.join(missing)}")
    if not isinstance(cfg.task, str):
        raise ValueError(f"task={cfg.task!r}: the pipeline transfers one task at a time; valid: {', '.join(TASKS)}")
    resolve_tasks(cfg.task)
    for s in cfg.stages:
        check_choice("stages[]", s, STAGES)
    for v in cfg.distill.variants:
        check_choice("distill.variants[]", v, VARIANTS)


def load_seeds(cfg: DictConfig, train: list[dict[str, str]]) -> list[str]:
    """Seed inputs: the first `seeds.n` task examples, or a JSONL file whose rows must belong to `task`."""
    if cfg.seeds.get("file"):
        p = Path(cfg.seeds.file).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"seeds.file={str(p)!r} does not exist")
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        bad = sorted({r.get("task") for r in rows if r.get("task", cfg.task) != cfg.task})
        if bad:
            raise ValueError(f"seeds.file holds examples of task(s) {bad} but task={cfg.task!r}: the task names must match")
        seeds = [str(r["input"]) for r in rows]
    else:
        seeds = [e["input"] for e in train[:int(cfg.seeds.n)]]
    if len(seeds) < int(cfg.synthesize.k):
        raise ValueError(f"only {len(seeds)} seed example(s) but synthesize.k={cfg.synthesize.k} are needed per prompt; "
                         f"provide more seeds (seeds.n / seeds.file) or lower synthesize.k")
    return seeds


def check_run_meta(run_dir: Path, cfg: DictConfig) -> None:
    """A run directory belongs to one (task, source, target): resuming it with other names is an error."""
    meta = {"task": cfg.task, "source": cfg.source.get("name"), "target": cfg.target.get("name"), "seed": cfg.seed}
    path = run_dir / "meta.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"run_dir {run_dir} was made for {old} but the config asks for {meta} (mismatch: "
                             + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
                             + "); use a new run_dir")
    else:
        path.write_text(json.dumps(meta, indent=2) + "\n")


def run_stage(ctx: Context, name: str, fn: Callable[[Context, Path], dict[str, Any]], stage: str) -> dict[str, Any]:
    """Run `fn` into `<name>.tmp` and rename it to `<name>`; skip when `<name>` exists (returns its metrics)."""
    final = ctx.artefact(name)
    if final.is_dir():
        log.info("[%s] %s exists: skipped", stage, final)
        metrics = final / "metrics.json"
        return json.loads(metrics.read_text()) if metrics.is_file() else {}
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    metrics = fn(ctx, tmp)
    metrics["seconds"] = time.perf_counter() - t0
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    tmp.rename(final)
    ctx.log_metrics(stage, metrics)
    return metrics


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured stages in pipeline order; returns {stage or artefact: metrics}."""
    validate(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_meta(run_dir, cfg)
    diff = dict(cfg.data.get("difficulty") or {})
    train = generate_split(cfg.task, "train", int(cfg.data.n_train), int(cfg.seed), **diff)
    test = generate_split(cfg.task, "test", int(cfg.data.n_test), int(cfg.seed), **diff)
    logger = instantiate(cfg.logger) if cfg.get("logger") and "_target_" in cfg.logger else None
    ctx = Context(cfg, run_dir, train, test, load_seeds(cfg, train), logger)
    wanted = [s for s in STAGES if s in set(cfg.stages)]
    log.info("Trans-LoRA %s -> %s on %s: stages %s in %s", cfg.source.get("name"), cfg.target.get("name"), cfg.task,
             wanted, run_dir)
    for stage in wanted:
        if stage == "distill":
            for v in cfg.distill.variants:
                ctx.results[f"distill_{v}"] = run_stage(ctx, f"distill_{v}", lambda c, d, v=v: S.distill(c, d, v), stage)
        else:
            ctx.results[stage] = run_stage(ctx, stage, getattr(S, stage), stage)
    if logger is not None:
        logger.finalize("success")
    return ctx.results
