"""wandb logger that never blocks a run: offline automatically when there are no credentials or no network."""

from __future__ import annotations

import netrc
import os
from typing import Any

from memfit.config import check_choice

MODES = ("auto", "online", "offline", "disabled")


def wandb_logged_in() -> bool:
    """Credentials present (API key in the environment or a netrc entry for the wandb host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    check_choice("logger.mode", mode, MODES)
    if mode != "auto":
        return mode
    return "online" if wandb_logged_in() else "offline"


def make_wandb_logger(project: str = "memfit", name: str | None = None, group: str | None = None,
                      tags: list[str] | None = None, save_dir: str = ".", mode: str = "auto", **kw: Any):
    from lightning.pytorch.loggers import WandbLogger

    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(project=project, name=name, group=group, tags=list(tags or []), save_dir=save_dir,
                       mode=resolve_mode(mode), **kw)
