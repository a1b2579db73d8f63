"""`storage=nf4`: replace every frozen nn.Linear weight (optionally lm_head / embeddings) by an `NF4Tensor`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from memfit.quant.nf4 import NF4Tensor


def _frozen_weight(module: nn.Module) -> torch.Tensor | None:
    w = getattr(module, "weight", None)
    if isinstance(w, nn.Parameter) and not w.requires_grad and w.is_floating_point() and not isinstance(w, NF4Tensor):
        return w
    return None


def nf4_targets(model: nn.Module, include_lm_head: bool = False, include_embeddings: bool = False) -> list[str]:
    """Names of the modules whose frozen weight `apply_nf4` converts. A weight shared by several modules (tied
    embeddings) is converted only if every module sharing it is a target, so the tie stays intact."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    owners: dict[int, list[tuple[str, bool]]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        w = _frozen_weight(mod)
        if w is None:
            continue
        if head is not None and mod is head:
            wanted = include_lm_head
        elif isinstance(mod, nn.Embedding):
            wanted = include_embeddings
        else:
            wanted = isinstance(mod, nn.Linear)
        owners.setdefault(id(w), []).append((name, wanted))
    return [n for group in owners.values() if all(ok for _, ok in group) for n, _ in group]


def apply_nf4(model: nn.Module, cfg: Mapping[str, Any]) -> nn.Module:
    """Quantize the frozen (requires_grad=False) Linear weights of `model` in place; trainable weights stay dense."""
    block_size = int(cfg.get("block_size", 64))
    double_quant = bool(cfg.get("double_quant", False))
    targets = set(nf4_targets(model, bool(cfg.get("include_lm_head", False)), bool(cfg.get("include_embeddings", False))))
    converted: dict[int, nn.Parameter] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if name not in targets:
            continue
        w = mod.weight
        if id(w) not in converted:
            converted[id(w)] = nn.Parameter(quantize_where_fast(w.data, block_size, double_quant), requires_grad=False)
        mod.weight = converted[id(w)]
    return model


def quantize_where_fast(w: torch.Tensor, block_size: int, double_quant: bool) -> NF4Tensor:
    """NF4 of `w`, computed on the GPU when the weight sits on the CPU and a GPU is present (one weight at a time, the
    codes brought back where the weight was): an 8B model's weights quantize in seconds there instead of minutes on
    the CPU, with the same bytes (the quantization is elementwise given each block's absmax). Double quantization stays
on the CPU: its second-level scales came out 1 ulp apart on the GPU (a reduction in another order)."""
    if w.device.type != "cpu" or not torch.cuda.is_available() or double_quant:
        return NF4Tensor.from_dense(w, block_size, double_quant)
    return NF4Tensor.from_dense(w.to("cuda"), block_size, double_quant).to(w.device)
