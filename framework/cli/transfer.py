"""`python -m memfit.cli.transfer [overrides]` (also `python -m memfit.transfer`, `memfit-transfer`): the Trans-LoRA
pipeline (conf/transfer.yaml)."""

from __future__ import annotations

import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from memfit.config import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="transfer")
def main(cfg: DictConfig) -> Any:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from memfit.cli.errors import run_cli
    from memfit.transfer.pipeline import run

    results: dict[str, Any] = {}
    code = run_cli(lambda: results.update(run(cfg)), "memfit.transfer")  # user errors: one line, exit code 1
    if code:
        sys.exit(code)
    ev = results.get("evaluate") or {}
    return ev.get("acc/target + transferred (filtered)")


if __name__ == "__main__":
    main()
