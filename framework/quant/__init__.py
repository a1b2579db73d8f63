"""Frozen-weight storage formats (dense, NF4, NeuZip) applied from the `storage` config group.

Each format lives in its own module and registers an `apply_*` function here by dotted path, so this file stays a
thin dispatcher and importing `memfit.quant` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import DictConfig
from torch import nn

from memfit.config import check_choice

# storage name -> "module:function" taking (model, cfg) and returning the model with its frozen weights converted
STORAGES: dict[str, str | None] = {
    "dense": None,
    "nf4": "memfit.quant.nf4_apply:apply_nf4",
    "neuzip": "memfit.quant.neuzip:apply_neuzip",
    "neuzip_lossy": "memfit.quant.neuzip:apply_neuzip",
}

# public tensor types, imported lazily: `from memfit.quant import NF4Tensor`
_EXPORTS = {
    "NF4Tensor": "memfit.quant.nf4",
    "NeuZipTensor": "memfit.quant.neuzip",
}


def apply_storage(model: nn.Module, cfg: DictConfig) -> nn.Module:
    """Convert the frozen (requires_grad=False) weights of `model` to the configured storage."""
    name = cfg.get("name", "dense")
    check_choice("storage.name", name, STORAGES)
    target = STORAGES[name]
    if target is None:
        return model
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)(model, cfg)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memfit.quant' has no attribute {name!r}")
