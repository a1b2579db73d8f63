"""Turn a (sharded) training checkpoint into a plain HF model directory.

    python -m memfit.cli.consolidate RUN/checkpoints/last.ckpt OUT_DIR [--config RUN/.hydra/config.yaml]

A `trainer=fsdp` checkpoint is a torch.distributed.checkpoint directory (one file per rank); a single-process or DDP
checkpoint is one file. Either way the model is rebuilt from the run's own config (model, adapter, storage), the
weights are loaded, adapters merged, and the result written with `save_pretrained` (+ tokenizer): loadable by
`AutoModelForCausalLM.from_pretrained` or `model=llama model.path=OUT_DIR`. No process group is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from memfit.cli.errors import run_cli
from memfit.export import export_hf
from memfit.runs import find_config, load_full_state


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
    """Exit code 0, or 1 with a one-line message for a user error (memfit.cli.errors)."""
    ap = argparse.ArgumentParser(prog="python -m memfit.cli.consolidate", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a Lightning checkpoint file or sharded checkpoint directory")
    ap.add_argument("out_dir", help="where to write the HF model directory")
    ap.add_argument("--config", help="the run's .hydra/config.yaml (default: found above the checkpoint)")
    args = ap.parse_args(argv)
    return run_cli(lambda: print(f"wrote {consolidate(args.checkpoint, args.out_dir, args.config)}"),
                   "memfit.cli.consolidate")


if __name__ == "__main__":
    sys.exit(main())
