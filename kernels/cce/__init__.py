"""Cut Cross-Entropy: `linear_cross_entropy(e, c, targets)` = cross_entropy(e @ c.T, targets) without the logits.

The N x V logit matrix never reaches global memory: the forward keeps a per-row log-sum-exp and target logit (Triton,
`cce_fwd.py`), the backward recomputes logit tiles and skips those whose softmax gradient is negligible (gradient
filtering with vocabulary sorting, `cce_bwd.py`). On CPU the same contract runs as a chunked pure-torch computation
(`cce_reference.py`). Both sit behind opaque custom ops (`cce_ops.py`), so autocast and torch.compile work; FSDP2
DTensor weights and vocabulary-parallel heads are handled in `dist.py`.
"""

from __future__ import annotations

from typing import Any

import torch

from memfit.kernels.cce.dist import VocabParallelCCE, gather_dtensor, is_dtensor, local_shard
from memfit.kernels.cce.ops import cce_forward, resolve_impl

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def auto_filter_eps(dtype: torch.dtype) -> float:
    """The peer's default: gradients below eps(dtype)/32 are lost in the dtype's rounding anyway (bf16: 2.4e-4)."""
    return torch.finfo(dtype).eps / 32 if dtype in (torch.float16, torch.bfloat16) else 0.0


def _check(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None, shift: int,
           softcap: float | None, reduction: str, label_smoothing: float, z_loss: float, filter_eps: Any) -> None:
    """Clear errors for bad input, each naming the problem."""
    if e.dim() < 1 or c.dim() != 2:
        raise ValueError(f"expected e (..., D) and c (V, D); got e {tuple(e.shape)} and c {tuple(c.shape)}")
    if e.shape[-1] != c.shape[1]:
        raise ValueError(f"hidden size mismatch: e has D={e.shape[-1]} but c has D={c.shape[1]}")
    if tuple(targets.shape) != tuple(e.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal e.shape[:-1] = {tuple(e.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if e.dtype not in FLOAT_DTYPES or c.dtype not in FLOAT_DTYPES:
        raise TypeError(f"e and c must be floating point (fp16/bf16/fp32/fp64), got {e.dtype} and {c.dtype}")
    if e.dtype != c.dtype:
        raise TypeError(f"e and c must share a dtype (or run under autocast), got {e.dtype} and {c.dtype}")
    tensors = {"e": e, "c": c, "targets": targets} | ({"bias": bias} if bias is not None else {})
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    if bias is not None and tuple(bias.shape) != (c.shape[0],):
        raise ValueError(f"bias must have shape (V,) = ({c.shape[0]},), got {tuple(bias.shape)}")
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift must be a non-negative int, got {shift!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not a valid option; choose one of: {', '.join(REDUCTIONS)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss!r}")
    if not (filter_eps is None or filter_eps == "auto" or (isinstance(filter_eps, (int, float)) and filter_eps >= 0)):
        raise ValueError(f"filter_eps must be 'auto', None (exact) or a float >= 0, got {filter_eps!r}")


def shift_targets(targets: torch.Tensor, shift: int, ignore_index: int) -> torch.Tensor:
    """Position t predicts targets[..., t + shift]; the last `shift` positions get ignore_index (E is never copied)."""
    if shift == 0:
        return targets
    pad = targets.new_full(targets.shape[:-1] + (min(shift, targets.shape[-1]),), ignore_index)
    return torch.cat([targets[..., shift:], pad], dim=-1)


def linear_cross_entropy(
    e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, *, bias: torch.Tensor | None = None,
    ignore_index: int = -100, shift: int = 0, softcap: float | None = None, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss: float = 0.0, filter_eps: float | str | None = "auto",
    return_lse: bool = False, accum_fp32: bool = False, sort_vocab: bool = True,
    vocab_parallel_group: Any = None, impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of logits softcap(e @ c.T + bias) against targets, without materialising the logits.

    e (..., D) hidden states; c (V, D) classifier (a DTensor is gathered; with `vocab_parallel_group` c is this rank's
    vocabulary slice, slices in rank order); targets (...) ids in [0, V) or ignore_index. reduction 'mean' averages over
    non-ignored tokens (0 with zero gradients when all are ignored); 'none' gives fp32 per-token losses (0 where
    ignored). z_loss adds z_loss * lse^2 per token. filter_eps: 'auto' = eps(dtype)/32, None or 0 = exact gradients.
    accum_fp32 accumulates dC in fp32 (more memory). return_lse also returns the fp32 per-token LSE (differentiable).
    impl: 'auto' (Triton on CUDA, chunked torch elsewhere), 'triton' (CPU needs TRITON_INTERPRET=1) or 'torch'.
    """
    shift = int(shift) if isinstance(shift, bool) else shift
    if vocab_parallel_group is None:
        c, bias = gather_dtensor(c), gather_dtensor(bias)
    else:
        c, bias = local_shard(c), local_shard(bias)
    if is_dtensor(e):
        e = e.full_tensor()
    if e.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(e.device.type):
        dt = torch.get_autocast_dtype(e.device.type)
        e, c = e.to(dt), c.to(dt)
        bias = bias.to(dt) if bias is not None else None
    _check(e, c, targets, bias, shift, softcap, reduction, label_smoothing, z_loss, filter_eps)
    impl = resolve_impl(impl, e.device)
    eps = auto_filter_eps(e.dtype) if filter_eps == "auto" else float(filter_eps or 0.0)
    out_shape = targets.shape
    tgt = shift_targets(targets, shift, ignore_index).reshape(-1).long().contiguous()
    e2 = e.reshape(-1, e.shape[-1]).contiguous()
    c, bias = c.contiguous(), (bias.contiguous() if bias is not None else None)
    args = (ignore_index, float(softcap or 0.0), float(label_smoothing), float(z_loss), eps, bool(sort_vocab),
            bool(accum_fp32), impl)
    with torch.autocast(e.device.type, enabled=False):
        if vocab_parallel_group is None:
            rows, lse = cce_forward(e2, c, bias, tgt, *args)
        else:
            rows, lse = VocabParallelCCE.apply(e2, c, bias, tgt, vocab_parallel_group, *args)
    if reduction == "mean":
        loss = rows.sum() / (tgt != ignore_index).sum().clamp(min=1)
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.reshape(out_shape)
    return (loss, lse.reshape(out_shape)) if return_lse else loss
