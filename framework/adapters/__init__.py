"""Low-rank adapters (LoRA / PiSSA / QPiSSA / LoftQ) applied to a model from the `adapter` config group."""

from __future__ import annotations

import copy

from omegaconf import DictConfig
from torch import nn

from framework.config import check_choice

ADAPTERS = ("none",)


def apply_adapter(model: nn.Module, cfg: DictConfig, storage: DictConfig | None = None) -> nn.Module:
    """`adapter=none` trains every weight (full fine-tuning). `storage` tells inits that quantize (QPiSSA, LoftQ)
    which format the frozen base will be stored in; `apply_storage` converts it afterwards."""
    name = cfg.get("name", "none")
    check_choice("adapter.name", name, ADAPTERS)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain HF model with any adapters merged into the weights (for saving as an ordinary checkpoint)."""
    return copy.deepcopy(model)
