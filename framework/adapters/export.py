"""Export any adapter in peft's on-disk LoRA format, loadable by `peft.PeftModel.from_pretrained` onto the ORIGINAL
HF model. PiSSA-style adapters (which replaced their base) are converted to rank-2r LoRAs first; the init metadata
(which init, whether the base was replaced) is kept in `memfit_adapter.json` and in the safetensors header.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from memfit.adapters.convert import LoraFactors, convert_to_lora
from memfit.adapters.layer import adapter_layers

META_FILE = "memfit_adapter.json"


def peft_config(factors: dict[str, LoraFactors], fan_in_fan_out: bool, dropout: float = 0.0,
                base_model: str | None = None) -> dict[str, Any]:
    """adapter_config.json: the most common rank/alpha as defaults, exact per-module patterns for the rest."""
    ranks = Counter(f.rank for f in factors.values())
    alphas = Counter(f.alpha for f in factors.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    rslora = {f.rslora for f in factors.values()}
    if len(rslora) > 1:
        raise ValueError("cannot export adapters that mix rsLoRA and plain scaling into one peft config")
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora.pop(), "bias": "none",
        "target_modules": sorted(factors), "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True,
        "rank_pattern": {re.escape(n): f.rank for n, f in factors.items() if f.rank != r},
        "alpha_pattern": {re.escape(n): f.alpha for n, f in factors.items() if f.alpha != alpha},
        "modules_to_save": None, "inference_mode": True,
    }


def export_peft(model: nn.Module, path: str | Path, base_model: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (+ memfit_adapter.json) under `path`."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapter layers to export")
    fifo = {lay.fan_in_fan_out for lay in layers.values()}
    if len(fifo) > 1:
        raise ValueError("cannot export Linear and Conv1D adapters into one peft config (fan_in_fan_out differs)")
    factors = {name: convert_to_lora(lay) for name, lay in layers.items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, f in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = f.lora_A.float().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = f.lora_B.float().contiguous().cpu()
    dropout = next(iter(layers.values())).dropout
    p = float(getattr(dropout, "p", 0.0))
    meta = {name: lay.init_meta for name, lay in layers.items()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(peft_config(factors, fifo.pop(), p, base_model), indent=2))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt", "memfit": json.dumps(meta)})
    (out / META_FILE).write_text(json.dumps({"layers": meta, "exported_for": "original base weights"}, indent=2))
    return out


def adapter_state(model: nn.Module) -> dict[str, Any]:
    """The trainable adapter tensors and init metadata of `model` (for the framework's own adapter checkpoints)."""
    layers = adapter_layers(model)
    tensors = {}
    for name, lay in layers.items():
        for key, t in lay.named_buffers(recurse=False):
            tensors[f"{name}.{key}"] = t.detach().cpu()
        tensors[f"{name}.lora_A"] = lay.lora_A.detach().cpu()
        tensors[f"{name}.lora_B"] = lay.lora_B.detach().cpu()
    return {"tensors": tensors, "meta": {name: lay.init_meta for name, lay in layers.items()}}
