"""Storage formats as configured objects: the `storage` config group instantiates one of these (`_target_`).

A storage object owns everything a format means for a run: `apply(model)` converts the frozen weights; `quantizer()`
is what an adapter init must fit against (QPiSSA's quantization-aware iterations, LoftQ) or None for a lossless
format; `callbacks()` are the Lightning callbacks the format needs (compressed full fine-tuning brings its
in-backward optimizer); `check(cfg)` refuses run settings the format cannot honour, at start. The adapters, the
LightningModule and the entry point ask the object and name no format.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

Quantizer = Callable[[torch.Tensor], torch.Tensor]


class Storage:
    """`storage=dense`: frozen weights stay ordinary tensors."""

    def __init__(self, name: str = "dense"):
        self.name = name

    def quantizer(self) -> Callable[[nn.Module], Quantizer] | None:
        """For a base layer, the (out, in) fp32 -> fp32 round trip its weight will go through; None if lossless."""
        return None

    def apply(self, model: nn.Module) -> nn.Module:
        return model

    def callbacks(self) -> list[L.Callback]:
        return []

    def trained_in_backward(self) -> set[str]:
        """Names of weights the format trains itself (outside the Lightning optimizer)."""
        return set()

    def check(self, cfg: DictConfig) -> None:
        """Refuse, at start, run settings this format cannot honour."""

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class NF4Storage(Storage):
    """`storage=nf4`: frozen Linear weights as NF4Tensor (bitsandbytes layout), dequantized on use."""

    def __init__(self, name: str = "nf4", block_size: int = 64, double_quant: bool = False,
                 include_lm_head: bool = False, include_embeddings: bool = False):
        from memfit.kernels.nf4 import check_block_size

        check_block_size(int(block_size))
        super().__init__(name)
        self.block_size, self.double_quant = int(block_size), bool(double_quant)
        self.include_lm_head, self.include_embeddings = bool(include_lm_head), bool(include_embeddings)

    def quantizer(self) -> Callable[[nn.Module], Quantizer]:
        """Exactly what `apply` will store: the layer's dtype cast, memory layout and block size."""
        from memfit.quant.nf4 import NF4Tensor

        block, double = self.block_size, self.double_quant

        def for_layer(base: nn.Module) -> Quantizer:
            dtype = base.weight.dtype
            transposed = type(base).__name__ == "Conv1D"

            def quantize(w: torch.Tensor) -> torch.Tensor:
                stored = (w.t() if transposed else w).to(dtype).contiguous()
                deq = NF4Tensor.from_dense(stored, block_size=block, double_quant=double).dequantize().float()
                return deq.t() if transposed else deq

            return quantize

        return for_layer

    def apply(self, model: nn.Module) -> nn.Module:
        from memfit.quant.nf4_apply import apply_nf4

        return apply_nf4(model, self.settings())


class NeuZipStorage(Storage):
    """`storage=neuzip` (lossless) / `neuzip_lossy` (`mantissa_bits` kept): frozen weights entropy-coded, decoded just
    in time; with `train_compressed` (full fine-tuning) the trained Linear weights too, updated inside backward."""

    def __init__(self, name: str = "neuzip", mantissa_bits: int | None = None, block_size: int | None = None,
                 include_embeddings: bool = False, min_numel: int = 4096, symbols_per_lane: int = 256,
                 train_compressed: bool = False):
        if name == "neuzip_lossy" and mantissa_bits not in (0, 1, 3):
            raise ValueError(f"storage=neuzip_lossy needs mantissa_bits in [0, 1, 3], got {mantissa_bits}")
        if int(symbols_per_lane) < 1:
            raise ValueError(f"storage.symbols_per_lane must be >= 1, got {symbols_per_lane}")
        super().__init__(name)
        self.mantissa_bits, self.block_size = mantissa_bits, block_size
        self.include_embeddings, self.min_numel = bool(include_embeddings), int(min_numel)
        self.symbols_per_lane, self.train_compressed = int(symbols_per_lane), bool(train_compressed)
        self._trainer: Any = None  # the InBackwardOptimizer of train_compressed, once applied

    def apply(self, model: nn.Module) -> nn.Module:
        from memfit.quant.neuzip_apply import apply_neuzip

        model, self._trainer = apply_neuzip(model, self.settings())
        return model

    def callbacks(self) -> list[L.Callback]:
        if self._trainer is None:
            return []
        from memfit.quant.neuzip_train import CompressedTraining

        return [CompressedTraining(self._trainer)]

    def trained_in_backward(self) -> set[str]:
        return set(self._trainer.names) if self._trainer is not None else set()

    def check(self, cfg: DictConfig) -> None:
        if not self.train_compressed:
            return
        if cfg.adapter.get("name") != "none":
            raise ValueError("storage.train_compressed=true is full fine-tuning with compressed weights: it needs "
                             f"adapter=none, got adapter={cfg.adapter.get('name')}")
        if "FSDP" in str(OmegaConf.select(cfg, "trainer.strategy._target_", default="")):
            raise ValueError("storage.train_compressed=true is not supported with trainer=fsdp (each rank would update "
                             "a compressed shard inside backward); use trainer=gpu (one device) or trainer=ddp")
        if int(cfg.trainer.get("accumulate_grad_batches", 1) or 1) != 1 or cfg.trainer.get("gradient_clip_val"):
            raise ValueError("storage.train_compressed=true updates each weight inside backward: it cannot "
                             "accumulate gradients (trainer.accumulate_grad_batches=1) or clip them "
                             "(trainer.gradient_clip_val=null)")


# run configs written before the storage group named its `_target_` (e.g. a run's .hydra/config.yaml read by
# consolidate) are built by name
BY_NAME: dict[str, type[Storage]] = {"dense": Storage, "nf4": NF4Storage, "neuzip": NeuZipStorage,
                                     "neuzip_lossy": NeuZipStorage}


def build_storage(cfg: Storage | DictConfig | dict | None) -> Storage:
    """The storage object of a `storage` config node (or the object itself)."""
    if isinstance(cfg, Storage):
        return cfg
    if cfg is None:
        return Storage()
    node = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    if "_target_" in node:
        from hydra.utils import instantiate

        return instantiate(node)
    from memfit.config import check_choice

    name = node.get("name", "dense")
    check_choice("storage.name", name, BY_NAME)
    return BY_NAME[name](**OmegaConf.to_container(node, resolve=True))
