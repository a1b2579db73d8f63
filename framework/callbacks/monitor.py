"""Throughput and memory monitor: tokens/s (non-padding tokens), per-device peak memory, and MFU when known."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning as L
import torch

# dense bf16 peak (FLOP/s) of accelerators we meet, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


class ThroughputMonitor(L.Callback):
    def __init__(self, log_every_n_steps: int = 10, warmup_steps: int = 2):
        self.log_every, self.warmup = log_every_n_steps, warmup_steps
        self.tokens = 0
        self.seconds = 0.0
        self._t0 = 0.0
        self.summary: dict[str, float] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        dt = time.perf_counter() - self._t0
        if trainer.global_step <= self.warmup:
            return
        n = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        self.tokens += n * trainer.world_size
        self.seconds += dt
        self.summary = self.compute(pl_module)
        if trainer.global_step % self.log_every == 0:
            pl_module.log_dict({f"perf/{k}": v for k, v in self.summary.items()}, on_step=True, on_epoch=False)

    def compute(self, pl_module: L.LightningModule) -> dict[str, float]:
        tps = self.tokens / max(self.seconds, 1e-9)
        out = {"tokens_per_s": tps, "peak_mem_gib": peak_memory_gib(pl_module.device)}
        if pl_module.device.type == "cuda":
            name = torch.cuda.get_device_name(pl_module.device)
            peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
            n_params = sum(p.numel() for p in pl_module.parameters())
            if peak:
                world = max(1, pl_module.trainer.world_size)
                out["mfu"] = 6 * n_params * tps / (peak * world)
        return out
