"""Training entry point: `python -m memfit.train [hydra overrides]` (or `./launch.sh`).

Composes data module + lit module + trainer from `conf/train.yaml`, optionally scores the base model first, fits,
tests, saves, and prints a before/after table.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from memfit.assemble import assemble
from memfit.callbacks.monitor import ThroughputMonitor
from memfit.config import build, check_choice
from memfit.module import LMModule
from memfit.parallel.slurm import SlurmRequeue, on_slurm
from memfit.report import print_summary

log = logging.getLogger(__name__)

# enum-like and typed fields checked at start with a message that names the field
TYPED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "seed": int,
    "trainer.max_steps": int,
    "trainer.accumulate_grad_batches": int,
    "data.batch_size": int,
    "data.max_length": int,
    "optim.lr": (int, float),
}


def validate(cfg: DictConfig) -> None:
    """Fail fast with messages that name the offending field."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"mandatory config value(s) not set: {', '.join(missing)} (e.g. `{missing[0]}=...`)")
    for key, typ in TYPED_FIELDS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, typ)):
            names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise TypeError(f"{key}={value!r} has the wrong type: expected {names}")
    if OmegaConf.select(cfg, "storage.train_compressed", default=False):
        if cfg.adapter.get("name") != "none":
            raise ValueError("storage.train_compressed=true is full fine-tuning with compressed weights: it needs "
                             f"adapter=none, got adapter={cfg.adapter.get('name')}")
        if int(cfg.trainer.get("accumulate_grad_batches", 1) or 1) != 1 or cfg.trainer.get("gradient_clip_val"):
            raise ValueError("storage.train_compressed=true updates each weight inside backward: it cannot "
                             "accumulate gradients (trainer.accumulate_grad_batches=1) or clip them "
                             "(trainer.gradient_clip_val=null)")
    check_choice("trainer.precision", str(cfg.trainer.get("precision", "32-true")),
                 ["32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true"])


def make_logger(cfg: DictConfig) -> Any:
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return False
    return instantiate(cfg.logger)


def make_callbacks(cfg: DictConfig) -> list[L.Callback]:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. Weights trained compressed (storage.train_compressed) count as trainable:
    the model's in-backward optimizer updates them, so they carry requires_grad=False for the Lightning one only."""
    in_backward = set(getattr(getattr(model, "neuzip_optimizer", None), "names", ()))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad or n in in_backward)
    return trainable, total


def run(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Run one training job from a composed config; returns the final metrics (also used by sweeps). `callbacks` are
    added to the configured ones (experiments attach their probes here)."""
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    t_start = time.perf_counter()
    model, tokenizer = assemble(cfg)

    datamodule = instantiate(cfg.data)
    datamodule.set_tokenizer(tokenizer)
    module = LMModule(
        model, tokenizer, loss_fn=build(cfg.loss), optimizer=instantiate(cfg.optim),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        generate_batches=cfg.eval.generate_batches, task_names=getattr(datamodule, "tasks", None),
    )
    callbacks = [*make_callbacks(cfg), *callbacks]
    if on_slurm() and not any(isinstance(c, SlurmRequeue) for c in callbacks):
        callbacks.append(SlurmRequeue())  # checkpoint + requeue on SIGUSR1/SIGTERM (framework/parallel/slurm.py)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=make_logger(cfg))

    results: dict[str, Any] = {"config": cfg}
    trainable, total = count_parameters(model)
    results.update(trainable_params=trainable, total_params=total)
    can_test = cfg.eval.test and datamodule.has_split("test")  # a generated test split or a data.test_file
    resuming = on_slurm() and trainer._checkpoint_connector._hpc_resume_path is not None  # a requeued job
    if cfg.eval.before and can_test and not resuming:
        results["before"] = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    results["train_loss"] = float(trainer.callback_metrics.get("train/loss", float("nan")))  # test() clears it
    if any(getattr(c, "stopped", False) for c in callbacks):  # preempted: the requeued job resumes and finishes
        log.warning("training stopped for a SLURM signal at step %d; exiting for the requeue", trainer.global_step)
        results["requeued"] = True
        return results
    if can_test:
        results["after"] = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    monitor = next((c for c in callbacks if isinstance(c, ThroughputMonitor)), None)
    results["perf"] = dict(monitor.summary) if monitor else {}
    results["seconds"] = time.perf_counter() - t_start
    sharded = getattr(trainer.strategy, "shard", None) is not None
    if sharded:  # FSDP2: trainable (adapter) tensors gathered to full tensors, written by rank 0
        from memfit.parallel.fsdp import save_sharded_model, save_trainable

        save_trainable(module.model, Path(cfg.paths.output_dir) / "trainable.safetensors")
        if cfg.get("save_model"):
            save_sharded_model(module, cfg, Path(cfg.save_model))
    if cfg.get("save_model") and trainer.is_global_zero and not sharded:
        save_dir = Path(cfg.save_model)
        from memfit.adapters import merged_copy

        merged_copy(module.model).save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
        log.info("saved model to %s", save_dir)
    if trainer.is_global_zero and cfg.get("print_summary", True):
        print_summary(results)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = run(cfg)
    after = results.get("after") or {}
    return after.get("test/loss", results.get("train_loss"))  # the value a sweeper would optimise


if __name__ == "__main__":
    main()
