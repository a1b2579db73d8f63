"""`storage=neuzip` / `neuzip_lossy`: replace frozen weights by `NeuZipTensor`s (and, with `train_compressed`, the
trained Linear weights too, with the in-backward optimizer that updates them)."""

from __future__ import annotations

from typing import Any

from torch import nn

from memfit.quant import neuzip_codec as codec
from memfit.quant.neuzip import NeuZipTensor, lane_length
from memfit.quant.neuzip_train import apply_trainable_neuzip


def apply_neuzip(model: nn.Module, cfg: Any) -> tuple[nn.Module, Any]:
    """Replace frozen Linear (and optionally Embedding / lm_head) weights by NeuZipTensors, in place; with
    `train_compressed` also the trainable Linear weights, updated inside backward (framework/quant/neuzip_train.py).
    Returns (model, the in-backward optimizer of those weights or None)."""
    k = cfg.get("mantissa_bits", None)
    if cfg.get("name") == "neuzip_lossy" and k not in (0, 1, 3):
        raise ValueError(f"storage=neuzip_lossy needs mantissa_bits in [0, 1, 3], got {k}")
    block = cfg.get("block_size", None)
    include_embeddings = bool(cfg.get("include_embeddings", False))
    min_numel = int(cfg.get("min_numel", 4096))
    spl = lane_length(cfg)
    trainer = None
    if cfg.get("train_compressed", False):  # full fine-tuning with the trained Linear weights compressed
        trainer = apply_trainable_neuzip(model, cfg)
    for name, mod in model.named_modules():
        is_lin = isinstance(mod, nn.Linear)
        is_emb = isinstance(mod, nn.Embedding) or name.endswith("lm_head")
        if not (is_lin or (include_embeddings and is_emb)) or (is_emb and not include_embeddings):
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or w.requires_grad or isinstance(w, NeuZipTensor) or w.numel() < min_numel:
            continue
        if w.dtype not in codec.FORMATS:
            continue
        mod.weight = nn.Parameter(NeuZipTensor.from_dense(w.data, k, block=block, symbols_per_lane=spl),
                                  requires_grad=False)
    return model, trainer
