"""Throughput/memory monitor (tokens/s over all ranks, per-rank peak memory, MFU when the FLOPs are known) and a
per-step loss log averaged over ranks (what a resumed or re-sharded run is compared against)."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

# dense bf16 peak (FLOP/s) of accelerators we meet, for MFU; override with ThroughputMonitor(peak_flops=...)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: every Linear costs 2N forward + 2N backward (input grads), plus 2N for the weight
    grads of trainable ones only (frozen/quantized bases skip them); attention scores add 12 * layers * hidden * seq.
    Recomputation under activation checkpointing is not counted (the MFU convention)."""
    frozen = trainable = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        for p in module.parameters(recurse=False):
            if p.dim() < 2:
                continue
            if p.requires_grad:
                trainable += p.numel()
            else:
                frozen += p.numel()
    flops = 4.0 * (frozen + trainable) + 2.0 * trainable
    cfg = getattr(model, "config", None)
    layers, hidden = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "hidden_size", None)
    if layers and hidden:
        flops += 12.0 * layers * hidden * seq_len
    return flops


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _gather(trainer: L.Trainer, values: list[float], device: torch.device) -> torch.Tensor:
    """(world, len(values)) tensor of every rank's values (a collective: all ranks call it at the same step)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if trainer.world_size <= 1:
        return t[None]
    return trainer.strategy.all_gather(t).reshape(trainer.world_size, len(values))


class ThroughputMonitor(L.Callback):
    """Logs perf/tokens_per_s (all ranks), perf/peak_mem_gib (max over ranks) and perf/peak_mem_gib/rank{i},
    perf/mfu when the device's peak FLOP/s is known (or given), every `log_every_n_steps` steps; `summary` holds the
    whole run's figures after training, also for runs shorter than the logging interval or the warm-up (then the
    warm-up steps are counted rather than reporting nothing)."""

    def __init__(self, log_every_n_steps: int = 10, warmup_steps: int = 2, peak_flops: float | None = None):
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every, self.warmup, self.peak_flops = log_every_n_steps, warmup_steps, peak_flops
        self.tokens = 0
        self.flops = 0.0
        self.seconds = 0.0
        self.warm = [0, 0.0, 0.0]  # tokens, flops, seconds of the warm-up steps (used only when nothing came after)
        self._t0 = 0.0
        self._flops_per_token: dict[int, float] = {}
        self.summary: dict[str, float] = {}
        self.model_mem_gib: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Peak memory counts from here: a before-training evaluation or a previous run in the process is not
        training's memory."""
        if pl_module.device.type == "cuda":
            self.model_mem_gib = torch.cuda.memory_allocated(pl_module.device) / 2**30  # weights + adapters
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        dt = time.perf_counter() - self._t0
        ids = batch["input_ids"]
        n = int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
        seq = ids.shape[-1]
        if seq not in self._flops_per_token:
            self._flops_per_token[seq] = model_flops_per_token(getattr(pl_module, "model", pl_module), seq)
        if trainer.global_step <= self.warmup:
            self.warm = [self.warm[0] + n, self.warm[1] + n * self._flops_per_token[seq], self.warm[2] + dt]
            return
        self.tokens += n
        self.flops += n * self._flops_per_token[seq]
        self.seconds += dt
        if trainer.global_step % self.log_every == 0:
            self.summary = self.compute(trainer, pl_module)
            pl_module.log_dict({f"perf/{k}": v for k, v in self.summary.items()}, on_step=True, on_epoch=False,
                               rank_zero_only=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.summary = self.compute(trainer, pl_module)

    def compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        counts = [self.tokens, self.flops, self.seconds] if self.tokens else self.warm
        rows = _gather(trainer, [*counts, peak_memory_gib(pl_module.device)], pl_module.device).cpu()
        seconds = float(rows[:, 2].max()) or 1e-9  # ranks run in lock-step; the slowest one sets the pace
        out = {"tokens_per_s": float(rows[:, 0].sum()) / seconds, "peak_mem_gib": float(rows[:, 3].max())}
        if self.model_mem_gib is not None:
            out["model_mem_gib"] = self.model_mem_gib  # this rank's
        if len(rows) > 1:
            out.update({f"peak_mem_gib/rank{i}": float(v) for i, v in enumerate(rows[:, 3])})
        peak = self.peak_flops or device_peak_flops(pl_module.device)
        if peak:
            out["mfu"] = float(rows[:, 1].sum()) / seconds / (peak * len(rows))
        return out


class LossLog(L.Callback):
    """Appends {"step", "loss"} per optimizer step to a JSONL file (rank 0), the loss averaged over ranks: with
    equal tokens per rank this is the loss of the global batch, comparable across world sizes and resumes."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = trainer.strategy.reduce(loss.detach().float(), reduce_op="mean")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": trainer.global_step, "loss": float(loss)}) + "\n")
