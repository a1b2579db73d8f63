"""The framework's own pre-training recipe for small bases, built on first use and cached by config hash.

A fresh machine has no pre-trained checkpoint and cannot download one, so `model=tiny` (with `pretrained: true`)
trains its base on the generated task suite (`experiment=<recipe>`) once, saves it as an HF directory and reuses it.
The recipe runs as its own app process (`python -m memfit.train` on the composed recipe, written to the base's run
directory): building a model never imports the training app, and the pre-training run keeps its own log and state.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from memfit.data.tasks import SUITE_VERSION

log = logging.getLogger(__name__)


def cache_key(cfg: DictConfig) -> str:
    """Hash of everything that determines the pre-trained weights."""
    payload = {
        "arch": OmegaConf.to_container(cfg.arch, resolve=True),
        "tokenizer": cfg.get("tokenizer", "char"),
        "tokenizer_vocab": cfg.get("tokenizer_vocab"),
        "init_seed": cfg.get("init_seed", 0),
        "recipe": cfg.get("recipe", "pretrain_tiny"),
        "recipe_overrides": list(cfg.get("recipe_overrides") or []),
        "suite_version": SUITE_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def ensure_pretrained(cfg: DictConfig, cache_dir: str | Path) -> Path:
    """Return the directory of the pre-trained base for `cfg`, training it first if it is not cached."""
    root = Path(cache_dir).expanduser().resolve() / "bases"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{cfg.get('name', 'model')}-{cache_key(cfg)}"
    with open(root / f"{target.name}.lock", "w") as lock:  # parallel sweep jobs build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        from memfit.config import compose

        recipe = cfg.get("recipe", "pretrain_tiny")
        log.info("pre-training base %s with experiment=%s (first use; cached afterwards)", target.name, recipe)
        pcfg = compose("train", [f"experiment={recipe}", *list(cfg.get("recipe_overrides") or [])])
        model_cfg = OmegaConf.to_container(cfg, resolve=True)
        model_cfg["pretrained"] = False
        pcfg.model = OmegaConf.create(model_cfg)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        pcfg.save_model = str(tmp)
        pcfg.paths.cache_dir = str(Path(cache_dir).expanduser().resolve())
        run_dir = root / f"{target.name}.run"
        run_dir.mkdir(parents=True, exist_ok=True)
        pcfg.paths.output_dir = str(run_dir)
        (run_dir / "recipe.yaml").write_text(OmegaConf.to_yaml(pcfg))
        cmd = [sys.executable, "-m", "memfit.train", "--config-path", str(run_dir), "--config-name", "recipe",
               f"hydra.run.dir={run_dir}"]
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(f"pre-training the base {target.name} failed: see {run_dir / 'train.log'} "
                               f"(command: {' '.join(cmd)})")
        tmp.rename(target)
    return target
