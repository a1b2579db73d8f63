"""A callback for a `python -m memfit.train` run under trainer=fsdp (tests/parallel/test_fsdp_reference.py): records, per
optimizer step, each rank's batch and loss, the full (all-gathered) gradients before clipping, and the full trainable
parameters before and after the step; rank 0 writes them to `path` (torch.save) when training ends.

Configured as `+callbacks.probe._target_=fsdp_probe.Probe +callbacks.probe.path=FILE` with tests/ on PYTHONPATH.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist


class Probe(L.Callback):
    def __init__(self, path: str):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.row: dict[str, Any] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        from memfit.parallel.fsdp import full_trainable_state

        mine = {k: v.detach().cpu() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        batches: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(batches, mine)
        self.row = {"batches": batches, "before": full_trainable_state(pl_module.model)}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.row["grads"] = {n: p.grad.full_tensor().cpu() for n, p in pl_module.model.named_parameters()
                             if p.requires_grad}
        self.row["lr"] = optimizer.param_groups[0]["lr"]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        from memfit.parallel.fsdp import full_trainable_state

        losses: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(losses, float(outputs["loss"].detach().float()))
        self.row.update(losses=losses, after=full_trainable_state(pl_module.model), step=trainer.global_step)
        self.rows.append(self.row)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            torch.save(self.rows, self.path)
