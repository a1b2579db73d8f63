"""The training progress bar: Lightning's rich bar, with an epoch count that means something for step-bounded runs.

Runs are bounded by `trainer.max_steps` with `max_epochs: -1`, for which Lightning prints "Epoch 4/-2"; here the last
epoch is derived from the step budget instead ("Epoch 4/12"), or left out when it cannot be known.
"""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import RichProgressBar


def last_epoch(max_epochs: int | None, max_steps: int, batches_per_epoch: float, accumulate: int) -> int | None:
    """Index of the last epoch a run will start, or None when neither bound is known."""
    bounds = []
    if max_epochs is not None and max_epochs > 0:
        bounds.append(max_epochs - 1)
    if max_steps > 0 and math.isfinite(batches_per_epoch) and batches_per_epoch > 0:
        steps_per_epoch = max(1, int(batches_per_epoch) // max(1, accumulate))
        bounds.append(math.ceil(max_steps / steps_per_epoch) - 1)
    return min(bounds) if bounds else None


class StepProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        t = self.trainer
        last = last_epoch(t.max_epochs, t.max_steps, float(self.total_train_batches), t.accumulate_grad_batches)
        text = f"Epoch {current_epoch}" + (f"/{last}" if last is not None else "")
        return f"{text:{len(self.validation_description)}}" if len(self.validation_description) > len(text) else text
