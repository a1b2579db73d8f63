"""Export a run's trained weights as a plain HF model directory: the model rebuilt from the run's config through the
one assembly path, the state loaded, adapters merged, `save_pretrained` (+ tokenizer). Used by `memfit.consolidate`
and by FSDP runs' `save_model=DIR`."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from memfit.adapters import merged_copy
from memfit.assemble import assemble

PREFIX = "model."  # LMModule keeps the HF model as `self.model`


def export_hf(cfg: DictConfig, state: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Rebuild the run's model from `cfg`, load `state` (LightningModule keys), merge adapters, save as HF."""
    model, tokenizer = assemble(cfg)
    weights = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not weights:
        raise ValueError(f"no '{PREFIX}*' keys in the checkpoint state (first keys: {sorted(state)[:5]})")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config's model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    out = Path(out_dir)
    merged_copy(model).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
