"""Batched rank-r truncated SVD of weight stacks (b, m, n): exact (Gram eigendecomposition) and randomized (Halko).

Why not `torch.linalg.svd`: PiSSA needs only the top r triplets, and a full thin SVD of a 14336 x 4096 matrix spends
most of its time on vectors that are thrown away. The exact mode eigendecomposes the Gram matrix of the smaller side
(one GEMM + one symmetric eigensolver of size min(m, n)); the randomized mode is the Halko et al. range finder with
power iterations, orthonormalised by Cholesky-QR in float64 (fast, batched GEMMs) with a Householder QR fallback.
Both return U (b, m, r), S (b, r) descending, Vh (b, r, n) in the input dtype (float32 expected).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def check_rank(shape: tuple[int, ...], r: int) -> None:
    """A rank above min(out, in) has no meaning for a truncated SVD."""
    m, n = shape[-2], shape[-1]
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"adapter rank must be a positive int, got {r!r}")
    if r > min(m, n):
        raise ValueError(f"adapter rank {r} is larger than min(out, in) = {min(m, n)} of a {m} x {n} weight")


def _finish(w: Tensor, evals: Tensor, evecs: Tensor, r: int, right: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r singular triplets from the eigenpairs of W^T W (right=True) or W W^T (right=False)."""
    evals, evecs = evals.flip(-1)[..., :r], evecs.flip(-1)[..., :r]
    s = evals.clamp_min(0).sqrt()
    inv = torch.where(s > 0, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    evecs = evecs.to(w.dtype)
    if right:  # evecs = V_r (n x r): U = W V / S
        u = (w @ evecs) * inv.to(w.dtype).unsqueeze(-2)
        return u, s.to(w.dtype), evecs.mT
    vh = (evecs.mT @ w) * inv.to(w.dtype).unsqueeze(-1)  # evecs = U_r (m x r): Vh = U^T W / S
    return evecs, s.to(w.dtype), vh


def exact_top_r(w: Tensor, r: int, gram_dtype: torch.dtype | None = None, extra: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-r SVD: eigenvectors of the Gram matrix of the smaller side (`gram_dtype`: float64 on CPU, float32 on
    GPU), then one Rayleigh-Ritz step on W itself over the top r + `extra` of them in float64, which removes the
    Gram's squared condition number from the result (mixing with the next `extra` vectors is resolved exactly)."""
    check_rank(tuple(w.shape), r)
    gd = gram_dtype or (torch.float64 if w.device.type == "cpu" else torch.float32)
    squeeze = w.dim() == 2
    w3 = w.unsqueeze(0) if squeeze else w
    right = w3.shape[-2] >= w3.shape[-1]
    wt = w3.mT if right else w3  # Gram of the smaller side == W W^T of `wt` (rows of wt = min(m, n))
    wg = wt.to(gd)
    k = min(r + extra, wt.shape[-2])
    _, basis = torch.linalg.eigh(wg @ wg.mT)
    q = orthonormalize(basis[..., -k:].to(w.dtype))  # top-k left basis of wt (order is redone by Rayleigh-Ritz)
    u, s, vh = rayleigh_ritz(wt, q, r)
    if right:
        u, vh = vh.mT, u.mT
    return (u[0], s[0], vh[0]) if squeeze else (u, s, vh)


def rayleigh_ritz(w: Tensor, q: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r SVD of Q Q^T W for an orthonormal left basis Q (b, m, k): the k x k problem is solved in float64."""
    small = q.mT @ w  # (b, k, n)
    s64 = small.double()
    evals, ub = torch.linalg.eigh(s64 @ s64.mT)
    u_s, s, vh = _finish(small, evals, ub, r, right=False)
    return q @ u_s, s, vh


def orthonormalize(y: Tensor) -> Tensor:
    """Orthonormal basis of the columns of y (b, m, k): Cholesky-QR2 in float64, Householder QR if it breaks down."""
    y64 = y.double()
    ok = True
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(y64.mT @ y64)
        if bool((info != 0).any()):
            ok = False
            break
        y64 = torch.linalg.solve_triangular(chol, y64.mT, upper=False).mT
    if not ok:
        return torch.linalg.qr(y.double()).Q.to(y.dtype)
    return y64.to(y.dtype)


def randomized_top_r(w: Tensor, r: int, niter: int, generator: torch.Generator | None = None,
                     oversample: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Halko et al. randomized SVD with `niter` power iterations (as `torch.svd_lowrank(q=r+oversample)`)."""
    check_rank(tuple(w.shape), r)
    if not isinstance(niter, int) or isinstance(niter, bool) or niter < 0:
        raise ValueError(f"adapter.niter must be a non-negative int or null (exact SVD), got {niter!r}")
    b, m, n = (1, *w.shape) if w.dim() == 2 else w.shape
    k = min(r + oversample, m, n)
    w3 = w.reshape(b, m, n)
    omega = torch.randn((b, n, k), generator=generator, device=w.device, dtype=w.dtype)
    q = orthonormalize(w3 @ omega)
    for _ in range(niter):
        q = orthonormalize(w3 @ orthonormalize(w3.mT @ q))
    u, s, vh = rayleigh_ritz(w3, q, r)  # W ~= Q Q^T W
    if w.dim() == 2:
        return u[0], s[0], vh[0]
    return u, s, vh


def top_r(w: Tensor, r: int, niter: int | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Exact when niter is None, randomized with `niter` power iterations otherwise."""
    if niter is None:
        return exact_top_r(w, r)
    return randomized_top_r(w, r, niter, generator)
