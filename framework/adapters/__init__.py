"""Low-rank adapters (LoRA / PiSSA / QPiSSA / LoftQ) applied to a model from the `adapter` config group.

QPiSSA is `adapter=pissa storage=nf4`: the storage config tells the init that the frozen base will be quantized, so it
runs the quantization-aware iterations with the very quantizer the storage step applies afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from memfit.adapters.convert import LoraFactors, convert_to_lora, merge, merged_copy
from memfit.adapters.export import adapter_state, export_peft
from memfit.adapters.inits import Quantizer
from memfit.adapters.inject import AdapterSpec, inject
from memfit.adapters.layer import LowRankAdapter, adapter_layers
from memfit.config import check_choice

ADAPTERS = ("none", "lora", "pissa", "loftq")
# storages whose frozen weights are lossy: PiSSA iterates against them (QPiSSA), LoftQ fits their error
QUANTIZED_STORAGES = ("nf4",)

__all__ = ["ADAPTERS", "AdapterSpec", "LoraFactors", "LowRankAdapter", "adapter_layers", "adapter_state",
           "apply_adapter", "convert_to_lora", "export_peft", "merge", "merged_copy", "nf4_quantizer", "spec_from_cfg"]


def nf4_quantizer(storage: DictConfig | dict) -> Callable[[nn.Module], Quantizer]:
    """For a base layer: (out, in) fp32 -> fp32 dequantization of exactly what `storage=nf4` will store (same dtype
    cast, same memory layout, same block size)."""
    from memfit.quant import NF4Tensor

    block = int(storage.get("block_size", 64))
    double = bool(storage.get("double_quant", False))

    def for_layer(base: nn.Module) -> Quantizer:
        dtype = base.weight.dtype
        transposed = type(base).__name__ == "Conv1D"

        def quantize(w: torch.Tensor) -> torch.Tensor:
            stored = (w.t() if transposed else w).to(dtype).contiguous()
            deq = NF4Tensor.from_dense(stored, block_size=block, double_quant=double).dequantize().float()
            return deq.t() if transposed else deq

        return quantize

    return for_layer


def spec_from_cfg(cfg: DictConfig | dict, quantized: bool = False) -> AdapterSpec:
    """The adapter config group as an AdapterSpec (QPiSSA iterations only when the storage is quantized)."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    name = c.get("name", "lora")
    iters = int(c.get("iters", 1)) if quantized else 1
    return AdapterSpec(
        init=name, rank=c.get("rank", 8), alpha=c.get("alpha", c.get("rank", 8)),
        targets=list(c.get("targets") or []), rank_pattern=dict(c.get("rank_pattern") or {}),
        alpha_pattern=dict(c.get("alpha_pattern") or {}), dropout=float(c.get("dropout", 0.0)),
        rslora=bool(c.get("rslora", False)), lora_init=str(c.get("init", "kaiming")), niter=c.get("niter"),
        iters=iters, init_device=str(c.get("init_device", "auto")), init_batch=int(c.get("init_batch", 16)),
        seed=int(c.get("seed", 0)), progress=bool(c.get("progress", True)),
    )


def apply_adapter(model: nn.Module, cfg: DictConfig, storage: DictConfig | None = None) -> nn.Module:
    """`adapter=none` trains every weight (full fine-tuning); otherwise only the adapter factors train. `storage`
    tells inits that quantize (QPiSSA, LoftQ) which format the frozen base will be stored in; `apply_storage`
    converts it afterwards."""
    name = cfg.get("name", "none")
    check_choice("adapter.name", name, ADAPTERS)
    if name == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    storage_name = (storage or {}).get("name", "dense")
    quantized = storage_name in QUANTIZED_STORAGES
    quantize_for = nf4_quantizer(storage) if quantized else None
    if name == "loftq" and not quantized:
        raise ValueError(f"adapter=loftq needs a quantized storage ({', '.join(QUANTIZED_STORAGES)}), "
                         f"got storage={storage_name}")
    inject(model, spec_from_cfg(cfg, quantized), quantize_for if name != "lora" else None)
    return model
