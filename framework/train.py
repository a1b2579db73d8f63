"""Training entry point: `python -m memfit.train [hydra overrides]` (or `./launch.sh`).

Composes data module + lit module + trainer from `conf/train.yaml`, optionally scores the base model first, fits,
tests, saves, and prints a before/after table.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from memfit.assemble import assemble
from memfit.callbacks.guard import FiniteLossGuard
from memfit.callbacks.monitor import ThroughputMonitor
from memfit.config import CONF_DIR, build, check_choice
from memfit.kernels.settings import configure as configure_kernels
from memfit.module import LMModule
from memfit.parallel.slurm import SlurmRequeue, on_slurm
from memfit.quant.storage import build_storage
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


def _positive(v: float) -> bool:
    return math.isfinite(v) and v > 0


# numeric fields checked at start: (key, test, what the value must be); absent or null fields are skipped
NUMERIC_FIELDS: list[tuple[str, Callable[[float], bool], str]] = [
    ("seed", lambda v: v >= 0, "an integer >= 0"),
    ("optim.lr", _positive, "a finite number > 0"),
    ("optim.weight_decay", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("trainer.max_steps", lambda v: v >= 1 or v == -1, "a positive integer (or -1: bounded by max_epochs)"),
    ("trainer.accumulate_grad_batches", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.log_every_n_steps", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.val_check_interval", lambda v: v >= 1 if isinstance(v, int) else 0 < v <= 1,
     "a step count >= 1 or a fraction of an epoch in (0, 1]"),
    ("trainer.gradient_clip_val", _positive, "a finite number > 0, or null for no clipping"),
    ("data.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("data.eval_batch_size", lambda v: v >= 1, "an integer >= 1 (or null: data.batch_size)"),
    ("data.max_length", lambda v: v >= 2, "an integer >= 2 (tokens per example)"),
    ("data.n_train", lambda v: v >= 1, "an integer >= 1"),
    ("data.n_val", lambda v: v >= 0, "an integer >= 0"),
    ("data.n_test", lambda v: v >= 0, "an integer >= 0"),
]
ADAPTER_FIELDS: list[tuple[str, Callable[[float], bool], str]] = [
    ("adapter.rank", lambda v: v >= 1 and v == int(v), "an integer >= 1"),
    ("adapter.alpha", _positive, "a finite number > 0"),
    ("adapter.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adapter.iters", lambda v: v >= 1, "an integer >= 1"),
]


def validate_numbers(cfg: DictConfig) -> None:
    """Range checks that name the field, before anything is built or scored (torch would otherwise reject a negative
    learning rate only after the before-evaluation, without naming `optim.lr`)."""
    fields = NUMERIC_FIELDS + (ADAPTER_FIELDS if cfg.get("adapter") and cfg.adapter.get("name") != "none" else [])
    for key, ok, must in fields:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{key}={value!r} has the wrong type: it must be {must}")
        if not ok(value):
            raise ValueError(f"{key}={value!r} is out of range: it must be {must}")


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
    validate_numbers(cfg)
    build_storage(cfg.get("storage")).check(cfg)
    if cfg.get("save_adapter"):
        if cfg.adapter.get("name", "none") == "none":
            raise ValueError("save_adapter=DIR exports a trained adapter in peft format: it needs adapter=lora|pissa|"
                             "loftq (for a full fine-tune use save_model=DIR)")
        if "FSDP" in str(OmegaConf.select(cfg, "trainer.strategy._target_", default="")):
            raise ValueError("save_adapter=DIR is not supported with trainer=fsdp: every FSDP run writes its adapter "
                             "tensors to RUN/trainable.safetensors; `python -m memfit.cli.consolidate` exports the model")
    check_choice("trainer.precision", str(cfg.trainer.get("precision", "32-true")),
                 ["32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true"])


def make_logger(cfg: DictConfig) -> Any:
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return False
    return instantiate(cfg.logger)


def make_callbacks(cfg: DictConfig, extra: Sequence[L.Callback] = (), has_logger: bool = True) -> list[L.Callback]:
    """The configured callbacks plus `extra`, the finite-loss guard, and SLURM's checkpoint-and-requeue when under
    SLURM. Without a logger (`logger=none`) the learning-rate monitor is left out: it can only log to a logger."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    if not has_logger:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks += list(extra)
    if not any(isinstance(c, FiniteLossGuard) for c in callbacks):
        callbacks.append(FiniteLossGuard(int(cfg.trainer.get("log_every_n_steps") or 1)))
    if on_slurm() and not any(isinstance(c, SlurmRequeue) for c in callbacks):
        callbacks.append(SlurmRequeue())  # checkpoint + requeue on SIGUSR1/SIGTERM (framework/parallel/slurm.py)
    return callbacks


def fp32_master_weights(model: torch.nn.Module, precision: str) -> int:
    """Trainable parameters of a bf16/fp16 checkpoint become fp32 (the optimizer's master weights; mixed precision
    computes in the low dtype), unless the run asked for pure low-precision training ("bf16-true", "16-true").
    Frozen weights keep their dtype. Returns how many parameters were cast."""
    if precision.endswith("-true") and not precision.startswith(("32", "64")):
        return 0
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            cast += 1
    return cast


def count_parameters(model: torch.nn.Module, in_backward: set[str] = frozenset()) -> tuple[int, int]:
    """(trainable, total) parameter counts. Weights the storage trains itself (`in_backward`, e.g. compressed full
    fine-tuning) count as trainable: they carry requires_grad=False for the Lightning optimizer only."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad or n in in_backward)
    return trainable, total


DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
            "GROUP_RANK")


@contextmanager
def own_process_group() -> Iterator[None]:
    """A run that starts a process group in this process (FSDP2 on one device, say) ends it again and restores the
    distributed environment variables Lightning set: a second in-process run (a Hydra multirun, a test, an experiment)
    then starts clean, and child processes do not inherit a port that this process still holds."""
    import torch.distributed as dist

    started = not (dist.is_available() and dist.is_initialized())
    env = {k: os.environ.get(k) for k in DIST_ENV}
    try:
        yield
    finally:
        if started and dist.is_available() and dist.is_initialized() and not on_slurm():
            dist.destroy_process_group()
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def run(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Run one training job from a composed config; returns the final metrics (also used by sweeps). `callbacks` are
    added to the configured ones (experiments attach their probes here)."""
    with own_process_group():
        return _run(cfg, callbacks)


def set_cpu_threads(cfg: DictConfig) -> int | None:
    """A CPU run uses `cpu_threads` torch threads (auto: the idle cores), unless OMP_NUM_THREADS already decides.
    Returns the count set, or None when the run is on a GPU or the environment chose."""
    setting = cfg.get("cpu_threads", "auto")
    accel = str(cfg.trainer.get("accelerator", "auto"))
    on_cpu = accel == "cpu" or (accel == "auto" and not torch.cuda.is_available())
    if not on_cpu or setting is None or (setting == "auto" and "OMP_NUM_THREADS" in os.environ):
        return None
    if setting == "auto":
        from memfit.kernels.cpu import idle_cores

        n = idle_cores()
    elif isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1:
        n = setting
    else:
        raise ValueError(f"cpu_threads={setting!r} is not valid: auto or an integer >= 1")
    torch.set_num_threads(n)
    return n


def _run(cfg: DictConfig, callbacks: Sequence[L.Callback]) -> dict[str, Any]:
    validate(cfg)
    set_cpu_threads(cfg)
    configure_kernels(**(cfg.get("kernels") or {}))
    L.seed_everything(cfg.seed, workers=True)
    t_start = time.perf_counter()
    storage = build_storage(cfg.get("storage"))
    model, tokenizer = assemble(cfg, storage)
    fp32_master_weights(model, str(cfg.trainer.get("precision", "32-true")))

    datamodule = instantiate(cfg.data)
    datamodule.set_tokenizer(tokenizer)
    module = LMModule(
        model, tokenizer, loss_fn=build(cfg.loss), optimizer=instantiate(cfg.optim),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        generate_batches=cfg.eval.generate_batches, task_names=getattr(datamodule, "tasks", None),
    )
    logger = make_logger(cfg)
    callbacks = make_callbacks(cfg, [*storage.callbacks(), *callbacks], has_logger=bool(logger))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)

    results: dict[str, Any] = {"config": cfg}
    trainable, total = count_parameters(model, storage.trained_in_backward())
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
    results["callbacks"] = callbacks
    results["module"] = module  # for tests and experiments (a sweep's return value is the metric in `main`)
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
    if cfg.get("save_adapter") and trainer.is_global_zero:
        from memfit.adapters import export_peft

        results["adapter_dir"] = str(export_peft(module.model, Path(cfg.save_adapter), base_model=cfg.model.get("path")))
        log.info("saved the adapter in peft format to %s", cfg.save_adapter)
    if trainer.is_global_zero:
        write_results(Path(cfg.paths.output_dir) / "results.json", results)
    if trainer.is_global_zero and cfg.get("print_summary", True):
        print_summary(results)
    return results


def write_results(path: Path, results: dict[str, Any]) -> None:
    """The run's metrics as JSON in its output directory (before/after scores, throughput and memory, parameter
    counts, wall time): what sweeps and benchmarks read back without parsing logs."""
    keep = ("before", "after", "perf", "train_loss", "trainable_params", "total_params", "seconds")
    data = {k: results[k] for k in keep if k in results}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    tmp.replace(path)


def route_library_logs() -> None:
    """Send Lightning's log records through the root logger that Hydra configured (console + the run's train.log).
    Lightning gives its loggers their own console handler when imported before logging is set up, which kept every
    one of its lines out of train.log."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if type(h) is logging.StreamHandler]:
            lg.removeHandler(h)
        lg.propagate = True


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    route_library_logs()
    results = run(cfg)
    after = results.get("after") or {}
    return after.get("test/loss", results.get("train_loss"))  # the value a sweeper would optimise


if __name__ == "__main__":
    main()
