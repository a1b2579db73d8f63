"""Export a run's trained weights as a plain HF model directory: the model rebuilt from the run's config through the
one assembly path, the state loaded, adapters merged, `save_pretrained` (+ tokenizer). Used by `memfit.cli.consolidate`
and by FSDP runs' `save_model=DIR`."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from memfit.adapters import merged_copy
from memfit.runs import run_model


def export_hf(cfg: DictConfig, state: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Rebuild the run's model from `cfg`, load `state` (LightningModule keys), merge adapters, save as HF."""
    model, tokenizer = run_model(cfg, state)
    out = Path(out_dir)
    merged_copy(model).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
