"""LM losses as functions of (hidden states, classifier weight, labels): the model never returns logits in training.

`TorchCrossEntropy` materialises the logits (matmul + F.cross_entropy) and is the reference; `CutCrossEntropy` calls
the fused kernel in `memfit.kernels.cce`, which never holds the N x V logit matrix. Both take the same arguments, so a config
switch (`loss=torch|cce`) swaps them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memfit.data.collate import IGNORE_INDEX


def shift_labels(labels: torch.Tensor, shift: int) -> torch.Tensor:
    """Labels aligned to the hidden state that predicts them: position t predicts labels[t + shift]."""
    if shift == 0:
        return labels
    pad = labels.new_full(labels.shape[:-1] + (shift,), IGNORE_INDEX)
    return torch.cat([labels[..., shift:], pad], dim=-1)


class TorchCrossEntropy:
    """logits = hidden @ W^T (+ bias, optional tanh softcap), then token-mean cross-entropy over non-ignored labels."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0, z_loss: float = 0.0):
        self.ignore_index, self.label_smoothing, self.z_loss = ignore_index, label_smoothing, z_loss

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                 bias: torch.Tensor | None = None, shift: int = 1, softcap: float | None = None) -> torch.Tensor:
        logits = F.linear(hidden, weight, bias).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        target = shift_labels(labels, shift).reshape(-1)
        logits = logits.reshape(-1, logits.shape[-1])
        valid = target != self.ignore_index
        if not valid.any():  # all-ignored batch: a zero that still carries a graph, never NaN
            return logits.sum() * 0.0
        loss = F.cross_entropy(logits, target, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)
        if self.z_loss:
            lse = torch.logsumexp(logits[valid], dim=-1)
            loss = loss + self.z_loss * (lse**2).mean()
        return loss


class CutCrossEntropy:
    """Fused linear cross-entropy (`memfit.kernels.cce`): the same loss as TorchCrossEntropy without the N x V logits.

    Triton on CUDA, chunked torch on CPU; FSDP2-sharded (DTensor) head weights are gathered inside the call.
    `filter_eps` ('auto' | float | None = exact) trades a bounded gradient error for speed on GPU.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 filter_eps: float | str | None = "auto", accum_fp32: bool = False, impl: str = "auto"):
        from memfit.config import check_choice

        check_choice("loss.impl", impl, ["auto", "triton", "torch"])
        self.ignore_index, self.label_smoothing, self.z_loss = ignore_index, label_smoothing, z_loss
        self.filter_eps, self.accum_fp32, self.impl = filter_eps, accum_fp32, impl

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                 bias: torch.Tensor | None = None, shift: int = 1, softcap: float | None = None) -> torch.Tensor:
        from memfit.kernels.cce import linear_cross_entropy  # lazy: Triton kernels compile (or interpret) on first use

        return linear_cross_entropy(
            hidden, weight, labels, bias=bias, ignore_index=self.ignore_index, shift=shift, softcap=softcap or None,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, filter_eps=self.filter_eps,
            accum_fp32=self.accum_fp32, impl=self.impl,
        )
