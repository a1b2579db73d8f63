"""Shared plumbing of the training stages: in-memory prompt/completion data, Lightning fits with the framework's
LMModule, loading models with adapters, and saving the result as a plain HF checkpoint.

Every trained artefact (source LoRA, discriminator, transferred LoRA) is saved merged into an ordinary HF directory,
so later stages load it with `load_local` whatever adapter (LoRA, PiSSA, none) produced it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from datasets import Dataset
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from memfit.adapters import merged_copy
from memfit.assemble import assemble_parts
from memfit.config import build
from memfit.data.datamodule import PromptCompletionData
from memfit.models.build import load_local, resolve_dtype
from memfit.module import LMModule

log = logging.getLogger(__name__)


class RowsData(PromptCompletionData):
    """A data module over rows {prompt, completion[, task]} held in memory (training split only)."""

    def __init__(self, rows: list[dict[str, str]], **kw: Any):
        super().__init__(**kw)
        if not rows:
            raise ValueError("no training rows: the stage has nothing to train on")
        self.rows = rows

    def build_splits(self) -> dict[str, Dataset]:
        return {"train": self._encode(self.rows)}

    def val_dataloader(self) -> list:
        return []


class PrefixLogger(Logger):
    """Forwards a stage's metrics to the run's logger under `<stage>/...` so stages do not overwrite each other."""

    def __init__(self, base: Logger | None, prefix: str):
        super().__init__()
        self.base, self.prefix = base, prefix

    @property
    def name(self) -> str:
        return self.prefix

    @property
    def version(self) -> int | str:
        return self.base.version if self.base is not None else 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.base is not None:
            self.base.log_metrics({f"{self.prefix}/{k}": v for k, v in metrics.items()}, step)

    @rank_zero_only
    def save(self) -> None:
        if self.base is not None:
            self.base.save()


def load_adapted(model_cfg: DictConfig, adapter_cfg: DictConfig, storage_cfg: DictConfig, cache_dir: Path) -> Any:
    """(model with a fresh adapter, tokenizer) for a base given by a `model` config."""
    return assemble_parts(model_cfg, adapter_cfg, storage_cfg, cache_dir)


def load_checkpoint(path: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """A saved stage model (merged HF directory), frozen and in eval mode."""
    model, tok = load_local(path, resolve_dtype(dtype))
    model.eval().requires_grad_(False)
    return model, tok


def fit(model: Any, tok: Any, rows: list[dict[str, str]], tcfg: DictConfig, cfg: DictConfig, logger: Logger | None,
        stage: str, module_cls: type[LMModule] = LMModule, **module_kw: Any) -> dict[str, float]:
    """Train `model` on prompt/completion `rows` for `tcfg.steps` steps; returns the last train loss."""
    # a batch never exceeds the data (5 seed rows with batch 16 would give epochs of zero batches)
    data = RowsData(rows, batch_size=min(int(tcfg.batch_size), len(rows)), max_length=int(tcfg.max_length), seed=int(cfg.seed))
    data.set_tokenizer(tok)
    optim = instantiate(OmegaConf.merge(cfg.optim, {"lr": float(tcfg.lr)}))
    sched_cfg = OmegaConf.merge(cfg.scheduler, {"total_steps": int(tcfg.steps)}) if cfg.get("scheduler") else None
    module = module_cls(model, tok, loss_fn=build(cfg.loss), optimizer=optim,
                        scheduler=instantiate(sched_cfg) if sched_cfg else None, **module_kw)
    trainer: L.Trainer = instantiate(
        cfg.trainer, max_steps=int(tcfg.steps), logger=PrefixLogger(logger, stage) if logger else False,
        callbacks=[], enable_checkpointing=False, limit_val_batches=0, val_check_interval=None,
        check_val_every_n_epoch=None, default_root_dir=str(Path(cfg.run_dir) / ".lightning"),
    )
    log.info("[%s] training on %d rows for %d steps (lr %g, batch %d)", stage, len(rows), tcfg.steps, tcfg.lr,
             tcfg.batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        trainer.fit(module, datamodule=data)
    loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    log.info("[%s] final train loss %.4f", stage, loss)
    return {"train_loss": loss}


def save_merged(model: Any, tok: Any, path: Path) -> None:
    """Merge any adapters into the weights and save an ordinary HF checkpoint (loadable by `load_local`)."""
    shutil.rmtree(path, ignore_errors=True)
    merged_copy(model).save_pretrained(path)
    tok.save_pretrained(path)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
