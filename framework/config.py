"""Config helpers: locate the conf/ tree, compose configs outside a Hydra app, and check enum-like fields."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `conf/<config_name>.yaml` with overrides, inside or outside a running Hydra app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def check_choice(name: str, value: object, valid: Iterable[object]) -> None:
    """Fail at start, naming the field and the valid options, when an enum-like field holds an unknown value."""
    valid = list(valid)
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not a valid option; choose one of: {', '.join(map(str, valid))}")


def build(cfg: DictConfig, **kwargs):
    """`hydra.utils.instantiate` of a group config, dropping its descriptive `name` key."""
    from hydra.utils import instantiate

    keys = [k for k in cfg.keys() if k != "name"]
    return instantiate(OmegaConf.masked_copy(cfg, keys), **kwargs)
