"""The one low-rank adapter layer: y = base(x) + s * B(A(dropout(x))) around a frozen Linear or GPT-2 Conv1D.

The wrapped module stays intact as `base_layer` (its weight may be dense, NF4 or NeuZip storage: the layer only calls
it), so storage formats and generation keep working, and merging just hands the base layer back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memfit.adapters.inits import scaling


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D: weight stored (in, out), y = x W + b."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def base_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        return int(module.weight.shape[1]), int(module.weight.shape[0])
    raise TypeError(f"cannot adapt a {type(module).__name__}: only nn.Linear and transformers Conv1D layers")


def dense(weight: torch.Tensor) -> torch.Tensor:
    """A plain tensor for any stored weight: tensor subclasses (NF4, NeuZip) are dequantized."""
    if type(weight) not in (torch.Tensor, nn.Parameter) and hasattr(weight, "dequantize"):
        return weight.dequantize()
    return weight.detach()


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The base weight as an (out, in) dense tensor (a transposed view for Conv1D)."""
    w = dense(module.weight)
    return w.t() if is_conv1d(module) else w


class LowRankAdapter(nn.Module):
    """LoRA-family adapter. `init_meta` records the init (and whether it replaced the base weight, as PiSSA does);
    PiSSA-style inits also keep their initial factors (`lora_A_init`, `lora_B_init`) for the LoRA conversion."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        out_f, in_f = base_shape(base_layer)
        self.base_layer = base_layer
        self.rank, self.alpha, self.rslora = int(rank), float(alpha), bool(rslora)
        self.scaling = scaling(alpha, rank, rslora)
        self.fan_in_fan_out = is_conv1d(base_layer)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.zeros(rank, in_f, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.init_meta: dict[str, Any] = {"init": "lora", "base_modified": False}
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def set_factors(self, b: torch.Tensor, a: torch.Tensor, keep_init: bool = False) -> None:
        """Load B (out, r), A (r, in); `keep_init` stores copies as persistent buffers for `convert_to_lora`."""
        with torch.no_grad():
            self.lora_B.copy_(b)
            self.lora_A.copy_(a)
        if keep_init:
            self.register_buffer("lora_B_init", self.lora_B.detach().clone())
            self.register_buffer("lora_A_init", self.lora_A.detach().clone())

    def set_base_weight(self, w_out_in: torch.Tensor) -> None:
        """Replace the frozen base weight by an (out, in) matrix, stored in the base layer's layout and dtype."""
        weight = self.base_layer.weight
        value = w_out_in.t() if self.fan_in_fan_out else w_out_in
        with torch.no_grad():
            weight.copy_(value.to(dtype=weight.dtype))  # cast where the value is, then one copy to the weight

    def delta(self) -> torch.Tensor:
        """s * B @ A in (out, in) layout, fp32."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        h = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (h * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}, init={self.init_meta.get('init')}"


def adapter_layers(model: nn.Module) -> dict[str, LowRankAdapter]:
    """All adapter layers of a model by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankAdapter)}
