"""Triton backward of linear cross-entropy: recompute each logit tile, filter, then dE and dC in one pass.

One program per (row block, vocabulary tile), vocabulary-major so consecutive programs share a C tile in L2. Each
recomputes its logits (fp32 accumulation), forms d = a p - b onehot - u (times the softcap derivative) and, unless the
tile is filtered (no target inside and every p < eps: its contribution is below eps |a| per element), adds d C into an
fp32 dE scratch for its rows and d^T E into dC with atomics. Vocabulary sorting (columns ordered by average logit, passed
as a permutation) packs the few large-probability columns into few tiles so that most tiles are skipped.

Rows are processed in chunks: only rows with a non-zero coefficient are visited (ignored tokens cost nothing), and the fp32
dE scratch holds one chunk (<= ~16 MB), so memory stays at the gradient buffers plus a few MB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memfit.kernels.cce.fwd import _add, _max, _tanh, _up, upcast_dots

SCRATCH_BYTES = 8 << 20  # fp32 dE scratch per launch


@triton.jit
def _bwd_kernel(E, C, Bias, Rows, Tgt, Lse, A, B, U, Perm, DE, DC, DB,
                M, V, D, stride_e, stride_c, n_blocks, softcap, eps,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_U: tl.constexpr, FILTER: tl.constexpr,
                SORTED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    pid_n = pid % n_blocks
    pid_v = pid // n_blocks
    offs_m = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_m < M
    offs_m = offs_m.to(tl.int64)
    rows = tl.load(Rows + offs_m, mask=mask_n, other=0)
    tgt = tl.load(Tgt + offs_m, mask=mask_n, other=-1)
    lse = tl.load(Lse + offs_m, mask=mask_n, other=0.0)
    a = tl.load(A + offs_m, mask=mask_n, other=0.0)
    b = tl.load(B + offs_m, mask=mask_n, other=0.0)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    if SORTED:
        cols = tl.load(Perm + offs_v, mask=mask_v, other=0)
    else:
        cols = offs_v
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.full((BLOCK_N, BLOCK_V), 0.0, tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        mask_d = dd < D
        e = tl.load(E + rows[:, None] * stride_e + dd[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        c = tl.load(C + cols[None, :] * stride_c + dd[:, None], mask=mask_v[None, :] & mask_d[:, None], other=0.0)
        acc = tl.dot(_up(e, UPCAST), _up(c, UPCAST), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    mask = mask_n[:, None] & mask_v[None, :]
    p = tl.where(mask, tl.exp(acc - lse[:, None]), 0.0)
    is_t = (cols[None, :] == tgt[:, None]) & mask
    work = True
    if FILTER:
        work = (tl.reduce(tl.reduce(p, 1, _max), 0, _max) >= eps) | (
            tl.reduce(tl.reduce(is_t.to(tl.int32), 1, _max), 0, _max) > 0)
    if work:
        d = a[:, None] * p - tl.where(is_t, b[:, None], 0.0)
        if HAS_U:
            d -= tl.load(U + offs_m, mask=mask_n, other=0.0)[:, None]
        if SOFTCAP:
            d *= 1.0 - (acc / softcap) * (acc / softcap)
        d = tl.where(mask, d, 0.0)
        if HAS_BIAS:
            tl.atomic_add(DB + cols, tl.reduce(d, 0, _add), mask=mask_v, sem="relaxed")
        d_lp = d.to(E.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            mask_d = dd < D
            c = tl.load(C + cols[:, None] * stride_c + dd[None, :], mask=mask_v[:, None] & mask_d[None, :], other=0.0)
            de = tl.dot(_up(d_lp, UPCAST), _up(c, UPCAST), input_precision=PRECISION)
            tl.atomic_add(DE + offs_m[:, None] * D + dd[None, :], de, mask=mask_n[:, None] & mask_d[None, :],
                          sem="relaxed")
            e = tl.load(E + rows[:, None] * stride_e + dd[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            dc = tl.dot(tl.trans(_up(d_lp, UPCAST)), _up(e, UPCAST), input_precision=PRECISION)
            tl.atomic_add(DC + cols[:, None] * D + dd[None, :], dc.to(DC.dtype.element_ty),
                          mask=mask_v[:, None] & mask_d[None, :], sem="relaxed")


def _config(dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages)."""
    if device.type != "cuda":
        return 16, 32, 16, 4, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 2
    return 64, 128, 64, 4, 3  # fastest of the configs swept on an H100 (experiments/cce_bench.py --sweep)


def vocab_order(e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Columns sorted by average logit over the visited rows (descending), so hot columns share tiles."""
    w = torch.zeros(e.shape[0], dtype=e.dtype, device=e.device).index_fill_(0, rows, 1.0 / rows.numel())
    mean_e = w @ e  # a mat-vec: no copy of E (fp32 accumulation inside the GEMV)
    score = (c @ mean_e).float()
    if bias is not None:
        score = score + bias.float()
    return torch.argsort(score, descending=True)


def grad_triton(e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, tgt: torch.Tensor, lse: torch.Tensor,
                a: torch.Tensor, b: torch.Tensor, u: torch.Tensor | None, softcap: float | None,
                filter_eps: float | None, sort_vocab: bool = True, accum_fp32: bool = False,
                config: tuple[int, int, int, int, int] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Triton twin of `reference.grad_torch` (plus filtering): (dE, dC, dbias) in the input dtypes."""
    n, d = e.shape
    v = c.shape[0]
    bn, bv, bd, warps, stages = config or _config(e.dtype, e.device)
    # dC accumulates in its own dtype unless asked otherwise; the interpreter (CPU tensors) has no bf16 atomic_add
    # (triton 3.9: "Unsupported data type"), so there bf16 dC alone accumulates in fp32 (GPU: tests/kernels/test_cce_gpu.py)
    dc_dtype = torch.float32 if (accum_fp32 or (c.device.type != "cuda" and c.dtype == torch.bfloat16)) else c.dtype
    dc = torch.zeros(c.shape, dtype=dc_dtype, device=c.device)
    db = torch.zeros(v, dtype=torch.float32, device=c.device) if bias is not None else None
    de = torch.zeros_like(e)
    if u is not None and u.abs().max() == 0:
        u = None
    active = (a != 0) | (b != 0) | (u != 0 if u is not None else False)
    rows = torch.nonzero(active).flatten()
    m_all = rows.numel()
    if m_all == 0:
        return de, dc.to(c.dtype), (db.to(bias.dtype) if db is not None else None)
    tgt_r, lse_r = tgt[rows].contiguous(), lse[rows].float().contiguous()
    a_r, b_r = a[rows].float().contiguous(), b[rows].float().contiguous()
    u_r = u[rows].float().contiguous() if u is not None else a_r
    perm = vocab_order(e, c, bias, rows) if (sort_vocab and filter_eps) else rows
    precision = "ieee" if e.dtype == torch.float32 else "tf32"
    chunk = max(bn, (SCRATCH_BYTES // (4 * d)) // bn * bn)
    v_tiles = triton.cdiv(v, bv)
    for m0 in range(0, m_all, chunk):
        m1 = min(m_all, m0 + chunk)
        scratch = torch.zeros(m1 - m0, d, dtype=torch.float32, device=e.device)
        n_blocks = triton.cdiv(m1 - m0, bn)
        _bwd_kernel[(n_blocks * v_tiles,)](
            e, c, bias if bias is not None else e, rows[m0:m1], tgt_r[m0:m1], lse_r[m0:m1], a_r[m0:m1], b_r[m0:m1],
            u_r[m0:m1], perm, scratch, dc, db if db is not None else scratch,
            m1 - m0, v, d, e.stride(0), c.stride(0), n_blocks, float(softcap or 1.0), float(filter_eps or 0.0),
            HAS_BIAS=bias is not None, SOFTCAP=bool(softcap), HAS_U=u is not None, FILTER=bool(filter_eps),
            SORTED=bool(sort_vocab and filter_eps), PRECISION=precision, UPCAST=upcast_dots(e),
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=warps, num_stages=stages,
        )
        de.index_copy_(0, rows[m0:m1], scratch.to(e.dtype))
    return de, dc.to(c.dtype), (db.to(bias.dtype) if db is not None else None)
