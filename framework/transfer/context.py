"""What every Trans-LoRA stage sees (the pipeline builds it, the stages read it): config, run directory, task data,
seed inputs, the run's logger; the stage names in pipeline order."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)

STAGES = ("source_lora", "discriminator", "synthesize", "distill", "evaluate")
VARIANTS = ("filtered", "unfiltered", "seeds")


@dataclass
class Context:
    """What every stage sees: the config, the run directory, the task data and the run's logger."""

    cfg: DictConfig
    run_dir: Path
    train: list[dict[str, str]]
    test: list[dict[str, str]]
    seeds: list[str]
    logger: Any = None
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return str(self.cfg.task)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg.paths.cache_dir).expanduser().resolve()

    @property
    def device(self) -> torch.device:
        """Where generation and scoring run: the GPU when the trainer may use one and there is one."""
        acc = str(self.cfg.trainer.get("accelerator", "auto"))
        return torch.device("cuda" if acc in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu")

    def artefact(self, name: str) -> Path:
        return self.run_dir / name

    def require(self, name: str, stage: str) -> Path:
        """An earlier stage's artefact, or a clear error naming the stage that makes it."""
        p = self.artefact(name)
        if not p.is_dir():
            maker = name.split("_")[0] if name.startswith("distill") else name
            raise FileNotFoundError(f"stage {stage} needs {p} (made by stage {maker}); "
                                    f"run it first, e.g. stages=[{maker},{stage}]")
        return p

    def log_metrics(self, stage: str, metrics: dict[str, float]) -> None:
        flat = {f"{stage}/{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        log.info("[%s] %s", stage, ", ".join(f"{k}={v:.4g}" for k, v in flat.items()))
        if self.logger is not None and flat:
            self.logger.log_metrics(flat, step=STAGES.index(stage))
            self.logger.save()
