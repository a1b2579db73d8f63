"""PiSSA -> LoRA conversion and merging adapters into plain weights.

Conversion (for sharing): a PiSSA-style adapter lives on the residual base W - s B0 A0. On the ORIGINAL base W the
same fine-tuned model is W + s (B A - B0 A0) = W + s' B' A' with A' = [A; A0], B' = [B, -B0] (rank 2r) and s' = s, i.e.
alpha' = 2 alpha (sqrt(2) alpha with rsLoRA). Merging folds s B A into the (dequantized) base weight.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from memfit.adapters.layer import LowRankAdapter, adapter_layers, dense, is_conv1d


@dataclass
class LoraFactors:
    """A plain LoRA on the original base: delta = scaling(alpha, rank, rslora) * B @ A."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank: int
    alpha: float
    rslora: bool


def convert_to_lora(layer: LowRankAdapter) -> LoraFactors:
    """The LoRA equivalent of `layer` on the original base weight (identity for LoRA-initialised layers)."""
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    if not layer.init_meta.get("base_modified"):
        return LoraFactors(a.clone(), b.clone(), layer.rank, layer.alpha, layer.rslora)
    if not hasattr(layer, "lora_A_init"):
        raise ValueError("this adapter replaced its base weight but holds no initial factors (lora_A_init/lora_B_init):"
                         " it cannot be converted to a LoRA on the original base")
    a2 = torch.cat([a, layer.lora_A_init.to(a.dtype)], dim=0)
    b2 = torch.cat([b, -layer.lora_B_init.to(b.dtype)], dim=1)
    alpha2 = layer.alpha * (math.sqrt(2.0) if layer.rslora else 2.0)
    return LoraFactors(a2, b2, 2 * layer.rank, alpha2, layer.rslora)


def merged_weight(layer: LowRankAdapter) -> torch.Tensor:
    """Dense base + s B A in the base layer's layout; the dtype is the (dequantized) base's."""
    base = dense(layer.base_layer.weight)
    delta = layer.delta().to(base.device)
    if layer.fan_in_fan_out:
        delta = delta.t()
    return (base.float() + delta).to(base.dtype)


def merge(model: nn.Module) -> nn.Module:
    """In place: every adapter layer becomes its base module holding dense merged weights."""
    for name, layer in adapter_layers(model).items():
        w = merged_weight(layer)
        base = layer.base_layer
        base.weight = nn.Parameter(w, requires_grad=False)
        model.set_submodule(name, base)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain HF model (deep copy) with adapters merged and storage dequantized, every weight trainable-free."""
    out = merge(copy.deepcopy(model))
    for module in out.modules():
        if (isinstance(module, nn.Linear) or is_conv1d(module)) and type(module.weight) not in (torch.Tensor, nn.Parameter):
            module.weight = nn.Parameter(dense(module.weight), requires_grad=False)
    return out
