"""Low-rank adapters (LoRA / PiSSA / QPiSSA / LoftQ) applied to a model from the `adapter` config group.

QPiSSA is `adapter=pissa storage=nf4`: the storage object hands the init its quantizer (the round trip the frozen base
will go through), so it runs the quantization-aware iterations with the very quantizer the storage step applies
afterwards; a lossless storage has none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from memfit.adapters.convert import LoraFactors, convert_to_lora, merge, merged_copy
from memfit.adapters.export import adapter_state, export_peft
from memfit.adapters.inits import Quantizer
from memfit.adapters.inject import AdapterSpec, inject
from memfit.adapters.layer import LowRankAdapter, adapter_layers
from memfit.config import check_choice

ADAPTERS = ("none", "lora", "pissa", "loftq")

__all__ = ["ADAPTERS", "AdapterSpec", "LoraFactors", "LowRankAdapter", "adapter_layers", "adapter_state",
           "apply_adapter", "convert_to_lora", "export_peft", "merge", "merged_copy", "nf4_quantizer", "spec_from_cfg"]


def nf4_quantizer(storage: DictConfig | dict) -> Callable[[nn.Module], Quantizer]:
    """The quantizer of an NF4 storage config (its block size and double quantization)."""
    from memfit.quant.storage import NF4Storage

    fields = dict(storage)
    fields.pop("_target_", None)
    return NF4Storage(**{"name": "nf4", **fields}).quantizer()


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


def apply_adapter(model: nn.Module, cfg: DictConfig, storage: Any = None) -> nn.Module:
    """`adapter=none` trains every weight (full fine-tuning); otherwise only the adapter factors train. `storage` (a
    storage object or config) gives inits that quantize (QPiSSA, LoftQ) the quantizer of the format the frozen base
    will be stored in; the storage converts it afterwards."""
    name = cfg.get("name", "none")
    check_choice("adapter.name", name, ADAPTERS)
    if name == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from memfit.quant.storage import build_storage

    store = build_storage(storage)
    quantize_for = store.quantizer()
    quantized = quantize_for is not None
    if name == "loftq" and not quantized:
        raise ValueError(f"adapter=loftq fits the quantization error of a lossy storage (storage=nf4), got "
                         f"storage={store.name}, which stores the base exactly")
    inject(model, spec_from_cfg(cfg, quantized), quantize_for if name != "lora" else None)
    return model
