"""Frozen-weight storage formats (dense, NF4, NeuZip) applied from the `storage` config group.

Each format is a storage object (memfit.quant.storage) that the `storage` config group instantiates; this file keeps
the names, a thin `apply_storage`, and loads the formats' op modules (which fill their tensor classes' op tables).
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

# the formats' op tables and F.linear hooks, filled as the package loads (the tensor modules never import them)
from memfit.quant import neuzip_ops, neuzip_prefetch, nf4_ops  # noqa: E402,F401  isort: skip

# the storage formats of the `storage` config group, by name (conf/storage/*.yaml instantiate their classes)
STORAGES: dict[str, str] = {"dense": "Storage", "nf4": "NF4Storage", "neuzip": "NeuZipStorage",
                            "neuzip_lossy": "NeuZipStorage"}

# public tensor types, imported lazily: `from memfit.quant import NF4Tensor`
_EXPORTS = {
    "NF4Tensor": "memfit.quant.nf4",
    "NeuZipTensor": "memfit.quant.neuzip",
}


def apply_storage(model: nn.Module, cfg: Any) -> nn.Module:
    """Convert the frozen (requires_grad=False) weights of `model` to the configured storage (a config node, a dict or
    a storage object)."""
    from memfit.quant.storage import build_storage

    return build_storage(cfg).apply(model)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memfit.quant' has no attribute {name!r}")
