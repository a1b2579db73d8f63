"""Chunked pure-torch linear cross-entropy: the CPU implementation and the tests' second reference.

Both functions work on flattened inputs (e (N, D), c (V, D)) and walk the vocabulary in chunks, so no more than
N x chunk_v logits exist at once (chunk_v = budget // N): memory O(budget), never the N x V matrix. They are the
pure-torch twins of the Triton kernels in `cce_fwd.py` / `cce_bwd.py` and share their contract:

  stats:  lse_i = logsumexp_j z_ij, tlogit_i = z_{i, t_i} (0 where t_i < 0), sumz_i = sum_j z_ij
  grad:   d_ij = a_i p_ij - b_i [j == t_i] - u_i, times softcap'(x_ij); dE = d C, dC = d^T E, dbias = sum_i d_ij
with z_ij = softcap(e_i . c_j + bias_j) and p_ij = exp(z_ij - lse_i). The reference is always exact (no filtering).
"""

from __future__ import annotations

import torch

DEFAULT_BUDGET = 1 << 22  # logits held at once (elements): 16 MB in fp32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for every low-precision input; fp64 stays fp64 (the tests' ground truth)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softcap_fn(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2 style logit capping: s * tanh(x / s)."""
    return x if not softcap else softcap * torch.tanh(x / softcap)


def _chunk_v(n: int, v: int, budget: int) -> int:
    return max(1, min(v, budget // max(n, 1)))


def _logits(e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int,
            softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(capped logits, uncapped logits) of one vocabulary chunk in the compute dtype."""
    dt = compute_dtype(e.dtype)
    x = e.to(dt) @ c[v0:v1].to(dt).T
    if bias is not None:
        x = x + bias[v0:v1].to(dt)
    return softcap_fn(x, softcap), x


def stats_torch(e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, tgt: torch.Tensor,
                softcap: float | None, need_sumz: bool,
                budget: int = DEFAULT_BUDGET) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row LSE, target logit and logit sum, online over vocabulary chunks."""
    n, v = e.shape[0], c.shape[0]
    dt = compute_dtype(e.dtype)
    m = torch.full((n,), -float("inf"), dtype=dt, device=e.device)
    s = torch.zeros(n, dtype=dt, device=e.device)
    tlogit = torch.zeros(n, dtype=dt, device=e.device)
    sumz = torch.zeros(n, dtype=dt, device=e.device)
    step = _chunk_v(n, v, budget)
    rows = torch.arange(n, device=e.device)
    for v0 in range(0, v, step):
        v1 = min(v, v0 + step)
        z, _ = _logits(e, c, bias, v0, v1, softcap)
        m_new = torch.maximum(m, z.max(dim=1).values)
        s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(dim=1)
        m = m_new
        hit = (tgt >= v0) & (tgt < v1)
        tlogit = tlogit + torch.where(hit, z[rows, (tgt - v0).clamp(0, v1 - v0 - 1)], torch.zeros_like(tlogit))
        if need_sumz:
            sumz = sumz + z.sum(dim=1)
    lse = m + torch.log(s)
    return lse, tlogit, sumz


def grad_torch(e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, tgt: torch.Tensor, lse: torch.Tensor,
               a: torch.Tensor, b: torch.Tensor, u: torch.Tensor | None, softcap: float | None,
               budget: int = DEFAULT_BUDGET) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Exact gradients (dE, dC, dbias) by recomputing each vocabulary chunk's logits; fp32 (or fp64) accumulation."""
    n, v = e.shape[0], c.shape[0]
    dt = compute_dtype(e.dtype)
    de = torch.zeros(e.shape, dtype=dt, device=e.device)
    dc = torch.empty_like(c)
    db = torch.empty_like(bias) if bias is not None else None
    step = _chunk_v(n, v, budget)
    ef = e.to(dt)
    lse, a, b = lse.to(dt), a.to(dt), b.to(dt)
    for v0 in range(0, v, step):
        v1 = min(v, v0 + step)
        z, _ = _logits(e, c, bias, v0, v1, softcap)
        d = a[:, None] * torch.exp(z - lse[:, None])
        cols = torch.arange(v0, v1, device=e.device)
        d = d - torch.where(cols[None, :] == tgt[:, None], b[:, None], torch.zeros_like(d))
        if u is not None:
            d = d - u.to(dt)[:, None]
        if softcap:
            d = d * (1 - (z / softcap) ** 2)
        cv = c[v0:v1].to(dt)
        de += d @ cv
        dc[v0:v1] = (d.T @ ef).to(c.dtype)
        if db is not None:
            db[v0:v1] = d.sum(dim=0).to(db.dtype)
    return de.to(e.dtype), dc, db
