"""The one assembly path: config -> (model, tokenizer), with the adapter and the weight storage applied.

The app (`memfit.train.run`), the consolidate/evaluate/transfer tools and the experiments all build models here, so a
composition that trains is the composition that is exported, evaluated or benchmarked. The adapter is applied first
(it asks the storage config which quantizer the frozen base will use: QPiSSA/LoftQ fit to the NF4 error), then the
storage replaces the frozen weights by their NF4/NeuZip form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

NONE_ADAPTER = OmegaConf.create({"name": "none"})


def adapt(model: nn.Module, adapter_cfg: DictConfig | None = None, storage: Any = None) -> nn.Module:
    """Apply the adapter (which asks the storage for its quantizer), then the storage, to a built model. `storage` is
    a storage object (memfit.quant.storage) or a `storage` config node; None is dense."""
    from memfit.adapters import apply_adapter
    from memfit.quant.storage import build_storage

    store = build_storage(storage)
    model = apply_adapter(model, NONE_ADAPTER if adapter_cfg is None else adapter_cfg, storage=store)
    return store.apply(model)


def assemble_parts(model_cfg: DictConfig, adapter_cfg: DictConfig | None = None, storage: Any = None,
                   cache_dir: str | Path = ".cache/memfit", seq_len: int | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a `model` config node plus an optional `adapter` node and storage (object or node);
    `seq_len` (the data's max_length) decides `model.activation_checkpointing: auto`."""
    from memfit.models import checkpointing
    from memfit.models.build import build_model

    model, tokenizer = build_model(model_cfg, Path(cache_dir).expanduser().resolve())
    if checkpointing.wanted(model_cfg.get("activation_checkpointing", False), seq_len):
        checkpointing.enable(model)
    return adapt(model, adapter_cfg, storage), tokenizer


def assemble(cfg: DictConfig, storage: Any = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a composed run config (its `model`, `adapter`, `storage` and `paths.cache_dir`); pass
    the run's storage object as `storage` to keep it (its callbacks come from it)."""
    seq_len = OmegaConf.select(cfg, "data.max_length", default=None)
    return assemble_parts(cfg.model, cfg.get("adapter"), storage if storage is not None else cfg.get("storage"),
                          cfg.paths.cache_dir, seq_len)
