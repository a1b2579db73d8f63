"""Quantization error reduction ratio (PiSSA paper): how much of the plain-quantization error an adapter init removes.

ratio = (1 - ||W - (deq(q(W_base)) + s B A)||_* / ||W - deq(q(W))||_*) * 100, ||.||_* the nuclear norm (float64).
QLoRA's is 0 by definition (B = 0, base = W).
"""

from __future__ import annotations

import torch

from memfit.adapters.inits import Quantizer, loftq_factors, pissa_factors, qpissa_factors, quantize_stack

METHODS = ("qlora", "loftq", "pissa")


def nuclear_norm(x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x.double(), ord="nuc"))


def error_reduction(w: torch.Tensor, approx: torch.Tensor, plain: torch.Tensor) -> float:
    """Percent of ||W - plain||_* removed by `approx` (the dequantized base plus the adapter delta)."""
    return (1.0 - nuclear_norm(w - approx) / nuclear_norm(w - plain)) * 100.0


def init_error_reduction(w: torch.Tensor, method: str, r: int, quantize: Quantizer, iters: int = 1,
                         niter: int | None = None, s: float = 1.0, seed: int = 0) -> float:
    """Error reduction ratio of one init on one (out, in) weight (fp32 compute; `quantize` as in inits)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a valid option; choose one of: {', '.join(METHODS)}")
    w32 = w.float().unsqueeze(0)
    plain = quantize_stack(w32, quantize)
    if method == "qlora":
        return error_reduction(w32[0], plain[0], plain[0])
    gen = torch.Generator(w.device).manual_seed(seed)
    fn = qpissa_factors if method == "pissa" else loftq_factors
    b, a, base = fn(w32, r, s, quantize, iters, niter, gen) if iters > 1 or method == "loftq" else \
        pissa_factors(w32, r, s, niter, gen)
    approx = quantize_stack(base, quantize)[0] + s * (b[0] @ a[0])
    return error_reduction(w32[0], approx, plain[0])
