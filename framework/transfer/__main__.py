"""`python -m memfit.transfer [overrides]`: the Trans-LoRA pipeline (conf/transfer.yaml).

This is the package's entry module: a sibling `framework/transfer.py` would be shadowed by this package.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../../conf", config_name="transfer")
def main(cfg: DictConfig) -> Any:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from memfit.compression.cli import run_cli
    from memfit.transfer.pipeline import run

    results: dict[str, Any] = {}
    code = run_cli(lambda: results.update(run(cfg)), "memfit.transfer")  # user errors: one line, exit code 1
    if code:
        sys.exit(code)
    ev = results.get("evaluate") or {}
    return ev.get("acc/target + transferred (filtered)")


if __name__ == "__main__":
    main()
