"""Frozen-weight storage formats (dense, NF4, NeuZip) applied from the `storage` config group."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from framework.config import check_choice

STORAGES = ("dense",)


def apply_storage(model: nn.Module, cfg: DictConfig) -> nn.Module:
    """`storage=dense` keeps the frozen weights as ordinary tensors."""
    check_choice("storage.name", cfg.get("name", "dense"), STORAGES)
    return model
