"""Turn a (sharded) training checkpoint into a plain HF model directory.

    python -m memfit.consolidate RUN/checkpoints/last.ckpt OUT_DIR [--config RUN/.hydra/config.yaml]

A `trainer=fsdp` checkpoint is a torch.distributed.checkpoint directory (one file per rank); a single-process or DDP
checkpoint is one file. Either way the model is rebuilt from the run's own config (model, adapter, storage), the
weights are loaded, adapters merged, and the result written with `save_pretrained` (+ tokenizer): loadable by
`AutoModelForCausalLM.from_pretrained` or `model=llama model.path=OUT_DIR`. No process group is needed.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from memfit.compression.cli import run_cli
from memfit.export import export_hf


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


def consolidate(ckpt: str | Path, out_dir: str | Path, config: str | Path | None = None) -> Path:
    cfg_path = Path(config) if config else find_config(ckpt)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"config {str(cfg_path)!r} does not exist")
    try:
        cfg: Any = OmegaConf.load(cfg_path)
    except yaml.YAMLError as e:
        raise ValueError(f"config {cfg_path} is not valid YAML ({' '.join(str(e).split())[:200]})") from None
    return export_hf(cfg, load_full_state(ckpt), out_dir)


def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 1 with a one-line message for a user error (memfit.compression.cli)."""
    ap = argparse.ArgumentParser(prog="python -m memfit.consolidate", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a Lightning checkpoint file or sharded checkpoint directory")
    ap.add_argument("out_dir", help="where to write the HF model directory")
    ap.add_argument("--config", help="the run's .hydra/config.yaml (default: found above the checkpoint)")
    args = ap.parse_args(argv)
    return run_cli(lambda: print(f"wrote {consolidate(args.checkpoint, args.out_dir, args.config)}"),
                   "memfit.consolidate")


if __name__ == "__main__":
    sys.exit(main())
