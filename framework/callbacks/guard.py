"""Stop a run whose training loss is no longer finite, with a message that says what to change.

Without it, a diverged run (e.g. `optim.lr=1e9`) trains to NaN, scores test/acc 0 and exits 0, which a sweep then
records as a legitimate result. The check reads the logged loss every `check_every_n_steps` steps (a NaN stays NaN,
so checking at the logging interval costs no extra device sync per step) and on the last step.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class FiniteLossGuard(L.Callback):
    def __init__(self, check_every_n_steps: int = 1):
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.every = check_every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        last = trainer.max_steps > 0 and step >= trainer.max_steps
        if step % self.every and not last and step > 1:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        value = float(loss.detach().float())
        if not math.isfinite(value):
            lrs = sorted({g["lr"] for opt in trainer.optimizers for g in opt.param_groups})
            lr = ", ".join(f"{x:g}" for x in lrs) or "?"
            raise NonFiniteLossError(
                f"train/loss is {value} at step {step}: training diverged (learning rate {lr}). Lower optim.lr, "
                "keep trainer.gradient_clip_val on, or check the data and model.dtype; the run was stopped so a "
                "diverged model is not scored or saved")
