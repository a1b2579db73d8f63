"""Benchmarks through the app: a random-weight HF checkpoint on disk, then `memfit.train.run` on a named
`conf/experiment/` recipe plus overrides; throughput, peak memory and MFU come from the app's own monitor.

The longest-sequence search reuses the trained LightningModule of that run (building an 8B model takes a minute) and
fits it again through Lightning with the recipe's data and trainer configs at each length: the same module, loss,
storage and adapters as the measured run, only the sequence length changes.
"""

from __future__ import annotations

import gc
import importlib.metadata as md
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=1048576,
                 tie_word_embeddings=False)
LLAMA32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=1048576,
                  tie_word_embeddings=False)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=False)


def versions() -> str:
    found = []
    for n in ["torch", "triton", "transformers", "peft", "bitsandbytes", "lightning", "liger-kernel",
              "cut-cross-entropy"]:
        try:
            found.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(found)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"


def make_checkpoint(arch: dict, out: Path) -> Path:
    """Random-weight bf16 Llama checkpoint plus a (character) tokenizer, loadable by `model=llama model.path=`.
    Weights are drawn on the GPU when there is one (an 8B model's 16 GB take minutes on a CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from memfit.models.tokenizer import char_tokenizer

    torch.manual_seed(0)
    where = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**arch, dtype="bfloat16"))
    model = model.to_empty(device=where).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():  # scaled-normal init; norms at 1
            p.copy_(torch.ones_like(p) if p.dim() == 1 else torch.randn_like(p) * 0.02)
    model.save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    del model
    free()
    return out


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def app_run(recipe: str, overrides: list[str], workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(row, results): `memfit.train.run` of `experiment=<recipe>` + overrides; the row holds the monitor's figures."""
    from memfit.config import compose
    from memfit.train import run

    cfg = compose("train", [f"experiment={recipe}", f"paths.output_dir={workdir}/run", f"paths.cache_dir={workdir}/c",
                            "trainer.enable_progress_bar=false", "print_summary=false", *overrides])
    rec = StepLosses()
    free()
    t0 = time.perf_counter()
    res = run(cfg, callbacks=[rec])
    perf = res["perf"]
    row = {"peak_gib": perf["peak_mem_gib"], "tokens_per_s": perf["tokens_per_s"], "mfu": perf.get("mfu"),
           "first_loss": rec.losses[0], "last_loss": rec.losses[-1], "wall_s": time.perf_counter() - t0,
           "losses": rec.losses}
    return row, res


def fits(res: dict[str, Any], seq: int) -> bool:
    """One training step of the run's module at `seq` tokens, through Lightning with the run's data/trainer configs."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg, module = res["config"], res["module"]
    data_cfg = OmegaConf.merge(cfg.data, {"max_length": seq, "n_train": 1, "n_val": 0})
    dm = instantiate(data_cfg)
    dm.set_tokenizer(module.tokenizer)
    trainer = instantiate(cfg.trainer, max_steps=1, callbacks=[], logger=False, enable_progress_bar=False,
                          enable_checkpointing=False, enable_model_summary=False)
    free()
    try:
        trainer.fit(module, datamodule=dm)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        for p in module.parameters():
            p.grad = None
        del trainer, dm
        free()


def longest(res: dict[str, Any], start: int, step: int = 8192, limit: int = 1 << 20,
            budget_s: float = float("inf")) -> str:
    """Longest multiple of `step` (from `start`, up to `limit`) that trains one step: doubling, then bisection; a
    bound ('>= N') when the time budget ends first."""
    t_end = time.perf_counter() + budget_s
    lo, hi = 0, start
    while hi <= limit and fits(res, hi):
        lo, hi = hi, hi * 2
        if time.perf_counter() > t_end:
            return f">= {lo}"
    if hi > limit:
        return f">= {lo} (limit)"
    while hi - lo > step:
        if time.perf_counter() > t_end:
            return f"{lo}-{hi - step}"
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(res, mid) else (lo, mid)
    return str(lo)
