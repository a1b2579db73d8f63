"""A run's artefacts read back: its checkpoint's full state (file or sharded directory), its config, and its model
rebuilt through the one assembly path with those weights loaded. Shared by export, consolidate and evaluate."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from memfit.assemble import assemble

PREFIX = "model."  # LMModule keeps the HF model as `self.model`


def load_full_state(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The LightningModule state dict of a checkpoint file or sharded (DCP) directory, as full CPU tensors."""
    path = Path(ckpt)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(f"{path} is a directory but not a sharded checkpoint (no .metadata file)")
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(path, Path(tmp) / "full.pt")
            state = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)
    elif path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as e:  # torch's words for "not a checkpoint file"
            raise ValueError(f"{path} is not a readable checkpoint ({' '.join(str(e).split())[:200]})") from None
    else:
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if not isinstance(state, dict) or "state_dict" not in state:
        keys = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} holds no 'state_dict' ({keys}): not a Lightning checkpoint")
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state["state_dict"].items()}


def find_config(ckpt: str | Path) -> Path:
    """The run's `.hydra/config.yaml`, looked for in the checkpoint's parent directories."""
    for parent in Path(ckpt).resolve().parents:
        candidate = parent / ".hydra" / "config.yaml"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no .hydra/config.yaml above {ckpt}; pass --config RUN_DIR/.hydra/config.yaml")


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str, expect: list[str]) -> None:
    """Load `weights` into `model`; every name in `expect` must be covered and no weight may be left over."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    lacking = [k for k in expect if k in missing]
    if unexpected or lacking:
        raise ValueError(f"{source} does not match the configured model: unexpected {unexpected[:5]}, missing "
                         f"{lacking[:5]} (is the model/adapter config the one it was trained with?)")


def run_model(cfg: DictConfig, state: dict[str, torch.Tensor], source: str = "checkpoint") -> tuple[nn.Module, Any]:
    """(model, tokenizer): the run's model, adapter and storage from `cfg`, with the LightningModule `state` loaded
    (every weight covered, none left over)."""
    model, tokenizer = assemble(cfg)
    weights = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not weights:
        raise ValueError(f"no '{PREFIX}*' keys in the {source} state (first keys: {sorted(state)[:5]})")
    expect = [k for k in model.state_dict() if not k.endswith("rotary_emb.inv_freq")]
    load_weights(model, weights, source, expect)
    return model, tokenizer
