"""Triton forward of linear cross-entropy: per-row log-sum-exp, target logit and logit sum, logits kept on chip.

Grid (row blocks, vocabulary splits). Each program owns BLOCK_N rows and one contiguous split of the vocabulary, walks
its BLOCK_V tiles with an online (max, sum-exp) in fp32, and writes one partial LSE per row and split; the few partials
are merged in torch (N x splits floats: no locks, no N x V buffer). Splits are sized so that the last wave of programs
is nearly full (`split_tiles`). The target logit comes from a separate gather-dot kernel (one dot per row), not from
a compare-and-sum in every tile. Offsets are 64-bit so N x V and V x D beyond 2^31 are safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tl has no tanh on every supported version; the sigmoid identity is exact enough in fp32
    return 2 / (1 + tl.exp(-2 * x)) - 1


# The kernels use only builtins plus these combine functions (no tl.sum / tl.max / tl.zeros, which are jit functions
# made when triton is imported): then they also run under an interpreter switched on after that import (CPU tests).
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _up(x, UPCAST: tl.constexpr):
    # UPCAST (set by `upcast_dots`): widen bf16 operands to fp32 before tl.dot, the same exact products
    if UPCAST:
        return x.to(tl.float32)
    return x


def upcast_dots(x: torch.Tensor) -> bool:
    """Only the Triton interpreter (CPU tensors) widens dot operands: its bf16 tl.dot is wrong (bf16 held as uint16;
    triton 3.9: errors ~1e10). bf16 products are exact in fp32, so this is the GPU's arithmetic up to summation order;
    fp16 and fp32 dots run as on the GPU."""
    return x.device.type != "cuda" and x.dtype == torch.bfloat16


@triton.jit
def _fwd_kernel(E, C, Bias, LsePart, SPart,
                N, V, D, stride_e, stride_c, tiles_per_split, softcap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SUMZ: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr, WIDE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row, the log-sum-exp (and logit sum) over this program's share of the vocabulary. WIDE: element offsets
    in 64 bits (some reach 2**31); otherwise 32-bit offsets, which keep the 128x256 tiles free of register spills."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n
    split = pid_s
    if WIDE:
        rows = rows.to(tl.int64)
        split = split.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    l_i = tl.full((BLOCK_N,), 0.0, tl.float32)
    s_i = tl.full((BLOCK_N,), 0.0, tl.float32)
    for t in range(0, tiles_per_split):
        v0 = (split * tiles_per_split + t) * BLOCK_V  # 64-bit when WIDE: `split` is
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        acc = tl.full((BLOCK_N, BLOCK_V), 0.0, tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            mask_d = dd < D
            e = tl.load(E + rows[:, None] * stride_e + dd[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            c = tl.load(C + offs_v[None, :] * stride_c + dd[:, None], mask=mask_v[None, :] & mask_d[:, None], other=0.0)
            acc = tl.dot(_up(e, UPCAST), _up(c, UPCAST), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(Bias + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
        if SOFTCAP:
            acc = softcap * _tanh(acc / softcap)
        if SUMZ:
            s_i += tl.reduce(tl.where(mask_v[None, :], acc, 0.0), 1, _add)
        acc = tl.where(mask_v[None, :], acc, -float("inf"))
        m_new = tl.maximum(m_i, tl.reduce(acc, 1, _max))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.reduce(tl.exp(acc - m_safe[:, None]), 1, _add)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(l_i), -float("inf"))
    out = split * N + rows
    tl.store(LsePart + out, lse, mask=mask_n)
    if SUMZ:
        tl.store(SPart + out, s_i, mask=mask_n)


@triton.jit
def _target_kernel(E, C, Bias, Tgt, Out, N, V, D, stride_e, stride_c, softcap,
                   HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Target logit per row, e_i . c_{t_i} (+ bias, softcap) in fp32; 0 where t_i is outside [0, V) (ignored)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < N
    tgt = tl.load(Tgt + rows, mask=mask_r, other=-1)
    ok = mask_r & (tgt >= 0) & (tgt < V)
    tg = tl.where(ok, tgt, 0).to(tl.int64)
    acc = tl.full((BLOCK_R,), 0.0, tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = ok[:, None] & (dd < D)[None, :]
        e = tl.load(E + rows[:, None] * stride_e + dd[None, :], mask=m, other=0.0).to(tl.float32)
        c = tl.load(C + tg[:, None] * stride_c + dd[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.reduce(e * c, 1, _add)
    if HAS_BIAS:
        acc += tl.load(Bias + tg, mask=ok, other=0.0).to(tl.float32)
    if SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    tl.store(Out + rows, tl.where(ok, acc, 0.0), mask=mask_r)


def _config(n: int, v: int, d: int, dtype: torch.dtype, device: torch.device) -> tuple[int, ...]:
    """(BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages): small tiles for the interpreter, Hopper-sized on GPU."""
    if device.type != "cuda":
        return 16, 32, 16, 4, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    return 128, 256, 64, 8, 3


# forward tile candidates timed on first use per shape (16-bit inputs on CUDA): (BLOCK_N, BLOCK_V, BLOCK_D, warps,
# stages); the fastest differ by GPU and by a few percent run to run (experiments/cce_bench.py --sweep lists more)
CANDIDATES = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 32, 8, 5), (128, 128, 64, 8, 4)]
_TUNED: dict[tuple, tuple[int, ...]] = {}
AUTOTUNE_MIN_MACS = 1 << 36  # below ~0.2 ms of tensor-core work per call the tiles differ by microseconds


def _autotune_on() -> bool:
    from memfit.kernels.settings import SETTINGS

    return SETTINGS.cce_autotune and not torch.cuda.is_current_stream_capturing()


def _tuned(e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, tgt: torch.Tensor, softcap: float | None,
           need_sumz: bool) -> tuple[int, ...]:
    """The fastest CANDIDATES entry for this (row bucket, V, D, dtype, options), timed once and cached."""
    key = (triton.next_power_of_2(e.shape[0]), c.shape[0], e.shape[1], e.dtype, e.device, bias is not None,
           bool(softcap), need_sumz)
    if key not in _TUNED:
        from memfit.kernels.tune import tuned

        _TUNED[key] = tuned("cce_fwd", key[:4] + key[5:], CANDIDATES,
                            lambda cfg: stats_triton(e, c, bias, tgt, softcap, need_sumz, config=cfg),
                            device=e.device, source_file=__file__, warmup=20, rep=100)
    return _TUNED[key]


INDEX_LIMIT = 1 << 31
FORCE_WIDE_INDEX = False  # tests: take the 64-bit offset path at any size


def wide_index(*extents: int) -> bool:
    """Whether element offsets up to max(extents) need 64 bits (else the kernels index in 32)."""
    return FORCE_WIDE_INDEX or max(extents) >= INDEX_LIMIT


def split_tiles(row_blocks: int, v_tiles: int, slots: int) -> int:
    """Vocabulary tiles per program: the count whose launch wastes least of the last wave (programs run in waves of
    `slots`; a wave that is a third full costs as much as a full one), each program paying ~0.1 tile of overhead."""
    def cost(t: int) -> float:
        return -(-row_blocks * -(-v_tiles // t) // slots) * (t + 0.1)

    return min(range(1, v_tiles + 1), key=lambda t: (cost(t), -t))


def stats_triton(e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, tgt: torch.Tensor,
                 softcap: float | None, need_sumz: bool,
                 config: tuple[int, int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.stats_torch`: (lse, target logit, logit sum) per row, fp32."""
    n, d = e.shape
    v = c.shape[0]
    if config is None and e.is_cuda and e.dtype != torch.float32 and n * v * d >= AUTOTUNE_MIN_MACS and _autotune_on():
        config = _tuned(e, c, bias, tgt, softcap, need_sumz)
    bn, bv, bd, warps, stages = config or _config(n, v, d, e.dtype, e.device)
    row_blocks = triton.cdiv(n, bn)
    v_tiles = triton.cdiv(v, bv)
    sms = torch.cuda.get_device_properties(e.device).multi_processor_count if e.device.type == "cuda" else 1
    slots = sms * max(1, (227 << 10) // (stages * (bn * bd + bd * bv) * e.element_size()))
    tiles_per_split = split_tiles(row_blocks, v_tiles, slots)
    splits = triton.cdiv(v_tiles, tiles_per_split)
    lse_p = torch.empty(splits, n, dtype=torch.float32, device=e.device)
    s_p = torch.empty_like(lse_p) if need_sumz else lse_p
    precision = "ieee" if e.dtype == torch.float32 else "tf32"
    _fwd_kernel[(row_blocks, splits)](
        e, c, bias if bias is not None else e, lse_p, s_p,
        n, v, d, e.stride(0), c.stride(0), tiles_per_split, float(softcap or 1.0),
        HAS_BIAS=bias is not None, SOFTCAP=bool(softcap), SUMZ=need_sumz, PRECISION=precision,
        UPCAST=upcast_dots(e), WIDE=wide_index(n * e.stride(0), v_tiles * bv * c.stride(0), splits * n),
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=warps,
        num_stages=stages,
    )
    tlogit = torch.empty(n, dtype=torch.float32, device=e.device)
    _target_kernel[(triton.cdiv(n, 32),)](e, c, bias if bias is not None else e, tgt, tlogit, n, v, d, e.stride(0),
                                         c.stride(0), float(softcap or 1.0), HAS_BIAS=bias is not None,
                                         SOFTCAP=bool(softcap), BLOCK_R=32, BLOCK_D=128)
    lse = torch.logsumexp(lse_p, dim=0) if splits > 1 else lse_p[0]
    sumz = s_p.sum(dim=0) if need_sumz else torch.zeros_like(lse)
    return lse, tlogit, sumz
