"""Adapter initialisations as pure functions of fp32 weight stacks W (b, out, in).

Every init returns (B (b, out, r), A (b, r, in), base (b, out, in)) with the adapter delta s * B @ A and `base` the
(pre-quantization) frozen weight that replaces W. The base is always computed from the returned factors, so an
approximate SVD never breaks base + s * B @ A == W for the dense inits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from memfit.adapters.svd import check_rank, top_r

Tensor = torch.Tensor
# maps a dense (out, in) fp32 matrix to the fp32 dequantization of its stored (quantized) form
Quantizer = Callable[[Tensor], Tensor]

LORA_INITS = ("kaiming", "gaussian")


def scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return float(alpha) / (math.sqrt(r) if rslora else r)


def lora_factors(w: Tensor, r: int, kind: str = "kaiming", generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """LoRA: B = 0 and A random (Kaiming-uniform as nn.Linear, or N(0, 1/r) as peft's "gaussian"); base unchanged."""
    check_rank(tuple(w.shape), r)
    b, out, inn = w.shape
    if kind == "kaiming":  # kaiming_uniform_(a=sqrt(5)) on (r, in): bound = 1/sqrt(in)
        bound = 1.0 / math.sqrt(inn)
        a = (torch.rand((b, r, inn), generator=generator, dtype=torch.float32) * 2 - 1) * bound
    elif kind == "gaussian":
        a = torch.randn((b, r, inn), generator=generator, dtype=torch.float32) / r
    else:
        raise ValueError(f"adapter.init={kind!r} is not a valid option; choose one of: {', '.join(LORA_INITS)}")
    return torch.zeros((b, out, r), dtype=torch.float32, device=w.device), a.to(w.device), w


def pissa_factors(w: Tensor, r: int, s: float, niter: int | None = None,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA: W = U S V^T, S_r /= s, B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, base = W - s B A."""
    u, sv, vh = top_r(w, r, niter, generator)
    root = (sv / s).sqrt()
    bb = u * root.unsqueeze(-2)
    aa = root.unsqueeze(-1) * vh
    return bb, aa, w - s * (bb @ aa)


def qpissa_factors(w: Tensor, r: int, s: float, quantize: Quantizer, iters: int = 5, niter: int | None = None,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """QPiSSA (official recipe): repeat T: (B, A) = PiSSA(target); target = W - deq(q(W - sBA)). Iteration 1 is
    plain PiSSA; the base W - sBA of the last iteration is what the storage step then quantizes."""
    _check_iters(iters)
    target = w
    for t in range(iters):
        bb, aa, res = pissa_factors(target, r, s, niter, generator)
        res = w - s * (bb @ aa)
        if t == iters - 1:
            return bb, aa, res
        target = w - quantize_stack(res, quantize)
    raise AssertionError("unreachable")


def loftq_factors(w: Tensor, r: int, s: float, quantize: Quantizer, iters: int = 5, niter: int | None = None,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """LoftQ: repeat T: deq = deq(q(base)); (B, A) = rank-r SVD of W - deq; base = W - sBA. The returned base is the
    one whose quantization the adapter was fitted to."""
    _check_iters(iters)
    base = w
    for t in range(iters):
        deq = quantize_stack(base, quantize)
        bb, aa, _ = pissa_factors(w - deq, r, s, niter, generator)
        if t == iters - 1:
            return bb, aa, base
        base = w - s * (bb @ aa)
    raise AssertionError("unreachable")


def quantize_stack(w: Tensor, quantize: Quantizer) -> Tensor:
    """Apply a per-matrix quantizer to every matrix of a (b, out, in) stack."""
    return torch.stack([quantize(m).to(device=w.device, dtype=w.dtype) for m in w.unbind(0)])


def _check_iters(iters: int) -> None:
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"adapter.iters must be a positive int (quantization-aware iterations), got {iters!r}")
