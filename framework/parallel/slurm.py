"""Preemption-safe SLURM runs: on SIGUSR1 (sbatch --signal, sent before the time limit) or SIGTERM (preemption,
scancel), checkpoint at the next step boundary on every rank, requeue the job, and stop.

Lightning's own SLURM handler saves the checkpoint inside the signal handler, i.e. at whatever point the signal lands
(possibly mid-backward, with a collective in flight on the other rank); here the handler only sets a flag, and at the
end of the current training step all ranks agree on it (one all-reduce) and save together. The checkpoint is the
`hpc_ckpt_<n>.ckpt` that Lightning resumes from automatically when the requeued job (same job id, same run directory)
starts again, so the resumed run continues the exact step sequence of an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: `<array job>_<task>` for an array element, else SLURM_JOB_ID."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and os.environ.get("SLURM_ARRAY_TASK_ID") is not None:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def on_slurm() -> bool:
    """Running as a SLURM task that Lightning treats as managed (srun / sbatch, not an interactive shell)."""
    return SLURMEnvironment.detect()


class SlurmRequeue(L.Callback):
    """Checkpoint-and-requeue on SIGUSR1/SIGTERM; installed by `memfit.train` whenever it runs under SLURM."""

    def __init__(self, requeue: bool = True):
        self.requeue = requeue
        self.signalled: int | None = None
        self.requeued = False  # rank 0: `scontrol requeue` succeeded
        self.stopped = False  # every rank: training stopped for a signal (the caller should exit, not test/save)
        self._previous: dict[int, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        env = trainer._accelerator_connector.cluster_environment  # what Lightning's signal connector reads
        if isinstance(env, SLURMEnvironment):
            env.auto_requeue = False  # replaced by this callback (Lightning's saves inside the signal handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning's signal connector registered its handlers (which would stop or save at a random point)
        for sig in REQUEUE_SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        flag = torch.tensor(float(self.signalled is not None), device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="sum")
        if float(flag) == 0:
            return
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        log.warning("signal received: saving %s at step %d and requeueing", path, trainer.global_step)
        for logger in trainer.loggers:
            logger.save()
        trainer.save_checkpoint(path)  # every rank takes part (sharded checkpoints are collective)
        job = slurm_job_id()
        if trainer.is_global_zero and self.requeue and job:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode != 0:
                log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
            else:
                log.warning("requeued SLURM job %s", job)
                self.requeued = True
        trainer.should_stop = True
        self.stopped = True
        self.signalled = None
