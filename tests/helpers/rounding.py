"""Rounding-error bounds for the kernel tests, from the dtype's unit roundoff u = eps/2 and the problem size.

A K-term sum in fp32 (tensor-core or CUDA-core accumulation, split-K partials included) is off by at most about
L sqrt(K) u32 sum|terms| (a probabilistic bound, Higham & Mary 2019: it fails only when the K rounding errors
conspire; L = 4); rounding the result to an output dtype adds u_out |result|. 16-bit products are exact in fp32.
The Triton interpreter (CPU tests) casts fp32 to bf16 by truncation, not round-to-nearest (triton 3.9): an error up
to eps = 2u there (`cast_roundoff`); the GPU rounds to nearest, and its tests (-m gpu) use u.
"""

from __future__ import annotations

import torch

U32 = 2.0**-24
L = 4.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """eps/2: fp32 2**-24, bf16 2**-9, fp16 2**-11."""
    return torch.finfo(dtype).eps / 2


def cast_roundoff(dtype: torch.dtype, interpreted: bool) -> float:
    """Relative error of one fp32 -> dtype cast inside a kernel: u, or eps for bf16 under the interpreter."""
    return 2 * unit_roundoff(dtype) if interpreted and dtype == torch.bfloat16 else unit_roundoff(dtype)


def matmul_bound(a: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, out_dtype: torch.dtype, *,
                 interpreted: bool = False) -> torch.Tensor:
    """Elementwise bound on |fl(a @ w) - ref| for a product accumulated in fp32 over K = a.shape[-1] terms and
    cast to out_dtype in the kernel; ref = a @ w in float64 on the same (rounded) operands. `interpreted`: the
    kernel also cast w to out_dtype itself (by truncation, where the reference rounded to nearest: eps |w| apart)."""
    k = a.shape[-1]
    s = a.double().abs() @ w.double().abs()
    acc = L * k**0.5 * U32 * s
    if interpreted and out_dtype == torch.bfloat16:
        acc = acc + 2 * unit_roundoff(out_dtype) * s
    return acc + cast_roundoff(out_dtype, interpreted) * (ref.abs() + acc)


def assert_within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str = "") -> float:
    """|out - ref| <= bound elementwise (and finite); returns the largest err / bound."""
    err = (out.double() - ref.double()).abs()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    ratio = float((err / bound.clamp(min=1e-300)).max())
    assert (err <= bound).all(), f"{what}: err/bound up to {ratio:.3g} (max err {float(err.max()):.3e})"
    return ratio
