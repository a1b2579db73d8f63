"""Fused NF4 dequant-GEMM for few rows (M <= `FUSED_MAX_M`): reads the packed 4-bit codes + per-block scales once and
dequantizes in registers, so a small-batch Linear never writes a temporary dense weight (dequantize + cuBLAS spends
most of its time writing and re-reading that copy, plus two launches).

W is [N, K] (out x in), stored flat like bitsandbytes: element (n, k) is nibble n*K + k (high nibble first), scale
block (n*K + k) // block_size. K must be even, so each row starts on a byte. Two products share one kernel:
  forward    y = a @ W^T  (a [M, K] -> [M, N]): programs own rows n of W, loop over k;
  backward   y = a @ W    (a [M, N] -> [M, K]): programs own byte-columns of W, loop over n.
The even / odd elements of a byte pair (high / low nibble) are two dot products against the even / odd columns of
`a`, so no in-register interleave is needed. The dequantized weight is rounded to the input dtype before the dot
(bf16(code * absmax), the same weight `dequantize` gives), accumulated in fp32.

Split-K: with few output tiles, SPLIT programs share one tile's reduction; each parks its fp32 partial in its own
slot of a per-device workspace, and the last one to arrive (atomic counter per tile) sums the slots in a fixed order
(deterministic), writes the output and resets the counter. No memset or reduction launch per call. The workspace
assumes one stream at a time per device.

For very few rows (forward, <= GEMV_MAX_M) a second kernel skips the tensor cores: a dot needs >= 16 rows, so one
token would pay for 16, and the dequantized tile would go through a layout conversion for the dot operand. The GEMV
tile is [rows, scale blocks, bytes per block], so a scale is loaded once per block and broadcast, and each input row
is a multiply-reduce over the same tile. The first-use autotune picks between both kinds per (shape, row bucket).

`nf4_matmul_reference` is the pure-torch twin (dequantize, then matmul) used on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from memfit.kernels.nf4 import dequantize_nf4_reference, nf4_code, nf4_code_pairs
from memfit.kernels.settings import SETTINGS

try:  # triton is optional on CPU-only machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

FUSED_MAX_M = 64  # rows up to which the fused kernel beats dequantize + cuBLAS (weight bytes dominate)
GEMV_MAX_M = 16  # rows up to which the tensor-core-free kernel is a candidate (its work grows with the rows)


@dataclass(frozen=True)
class MMConfig:
    """Tile of W per loop step: `tn` rows x `tkb` packed bytes (2*tkb elements); `split` programs per output tile."""

    tn: int
    tkb: int
    split: int
    warps: int = 4
    stages: int = 1  # software pipelining stages the gathers in shared memory (>200 KB): occupancy hides latency
    gemv: bool = False  # no tensor cores, K % block_size == 0; forward <= GEMV_MAX_M rows, backward 1 row
    blocked: bool = False  # tl.dot kernel with one scale load per block (K % block_size == 0)
    pairs: bool = False  # blocked/GEMV tiles: both nibbles of a byte from one 8-byte gather (nf4_code_pairs)


def nf4_matmul_reference(a: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, n: int, k: int,
                         block_size: int, trans: bool = False) -> torch.Tensor:
    """Pure-torch twin: a @ W^T (trans=False) or a @ W (trans=True) on the dequantized weight in a's dtype."""
    w = dequantize_nf4_reference(packed, absmax, (n, k), block_size, a.dtype)
    return a @ w if trans else a @ w.t()


if triton is not None:

    @triton.jit
    def _share(total, step: tl.constexpr, pid_s, SPLIT: tl.constexpr):
        """[start, end) of split-K program pid_s: a 1/SPLIT share of `total`, rounded up to whole `step`s."""
        chunk = ((total + SPLIT - 1) // SPLIT + step - 1) // step * step
        start = pid_s * chunk
        return start, tl.minimum(start + chunk, total)

    @triton.jit
    def _load_w(packed_ptr, s_ptr, s2_ptr, code_ptr, code8_ptr, offset, offs_n, offs_kb, nmask, kmask, K2,
                BS: tl.constexpr, DQ: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
        """Dequantized [TN, TKB] tiles of W's even (high nibble) and odd (low nibble) elements, in DTYPE."""
        byte = offs_n.to(tl.int64)[:, None] * K2 + offs_kb[None, :]
        mask = nmask[:, None] & kmask[None, :]
        b = tl.load(packed_ptr + byte, mask=mask, other=0).to(tl.int32)
        blk = byte // (BS // 2)
        if DQ:  # double quantization: absmax = code8[q] * absmax2[blk // 256] + offset
            q = tl.load(s_ptr + blk, mask=mask, other=0).to(tl.int32)
            s = tl.load(code8_ptr + q) * tl.load(s2_ptr + blk // 256, mask=mask, other=0.0) + offset
        else:
            s = tl.load(s_ptr + blk, mask=mask, other=0.0)
        s = tl.where(mask, s, 0.0)
        hi = (tl.load(code_ptr + (b >> 4)) * s).to(DTYPE)
        lo = (tl.load(code_ptr + (b & 15)) * s).to(DTYPE)
        if DOT_F32:
            hi = hi.to(tl.float32)
            lo = lo.to(tl.float32)
        return hi, lo

    @triton.jit
    def _load_w3(packed_ptr, s_ptr, s2_ptr, code_ptr, code8_ptr, offset, offs_n, kb0, nmask, K2,
                 BS: tl.constexpr, DQ: tl.constexpr, DTYPE: tl.constexpr, TKB: tl.constexpr, PAIRS: tl.constexpr):
        """Dequantized [TN, NB, HB] tiles (NB scale blocks of HB = BS/2 bytes from byte column kb0 of rows offs_n) of
        W's even / odd elements in DTYPE, and the [NB, HB] byte columns and their mask. One scale load per block,
        broadcast over its bytes; needs K % BS == 0 and kb0 % HB == 0, so that no block straddles two rows."""
        HB: tl.constexpr = BS // 2
        NB: tl.constexpr = TKB // HB
        offs_b = tl.arange(0, NB)
        col = kb0 + offs_b[:, None] * HB + tl.arange(0, HB)[None, :]
        cmask = col < K2
        row = offs_n.to(tl.int64) * K2
        b = tl.load(packed_ptr + row[:, None, None] + col[None, :, :], mask=nmask[:, None, None] & cmask[None, :, :],
                    other=0).to(tl.int32)
        blk = row[:, None] // HB + (kb0 // HB + offs_b)[None, :]
        bmask = nmask[:, None] & ((kb0 + offs_b * HB) < K2)[None, :]
        if DQ:
            q = tl.load(s_ptr + blk, mask=bmask, other=0).to(tl.int32)
            sc = tl.load(code8_ptr + q) * tl.load(s2_ptr + blk // 256, mask=bmask, other=0.0) + offset
        else:
            sc = tl.load(s_ptr + blk, mask=bmask, other=0.0)
        sc = tl.where(bmask, sc, 0.0)[:, :, None]
        if PAIRS:  # code_ptr is nf4_code_pairs: (code[b >> 4], code[b & 15]) as the two words of one int64
            pair = tl.load(code_ptr + b)
            hi = ((pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True) * sc).to(DTYPE)
            lo = ((pair >> 32).to(tl.int32).to(tl.float32, bitcast=True) * sc).to(DTYPE)
        else:
            hi = (tl.load(code_ptr + (b >> 4)) * sc).to(DTYPE)
            lo = (tl.load(code_ptr + (b & 15)) * sc).to(DTYPE)
        return hi, lo, col, cmask

    @triton.jit
    def _tile(packed_ptr, s_ptr, s2_ptr, code_ptr, code8_ptr, offset, offs_n, kb0, offs_kb, nmask, kmask, K2,
              BS: tl.constexpr, DQ: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr, TKB: tl.constexpr,
              BLOCKED: tl.constexpr, PAIRS: tl.constexpr):
        """[TN, TKB] dot operands: per-element scale gathers (any layout), or BLOCKED: the 3-D tile of `_load_w3`
        (one scale load per block; K % BS == 0) flattened back to 2-D."""
        if BLOCKED:
            hi3, lo3, col, cmask = _load_w3(packed_ptr, s_ptr, s2_ptr, code_ptr, code8_ptr, offset, offs_n, kb0,
                                            nmask, K2, BS, DQ, DTYPE, TKB, PAIRS)
            hi = tl.reshape(hi3, (offs_n.shape[0], TKB))
            lo = tl.reshape(lo3, (offs_n.shape[0], TKB))
            if DOT_F32:
                hi = hi.to(tl.float32)
                lo = lo.to(tl.float32)
        else:
            hi, lo = _load_w(packed_ptr, s_ptr, s2_ptr, code_ptr, code8_ptr, offset, offs_n, offs_kb, nmask, kmask,
                             K2, BS, DQ, DTYPE, DOT_F32)
        return hi, lo

    @triton.jit
    def _finish(acc, out_ptr, ws_ptr, lock_ptr, offs, mask, pid_s, slot, SPLIT: tl.constexpr):
        """Store the tile, or (split-K) park it in workspace slot pid_s; the last of SPLIT programs to arrive sums
        the slots in a fixed order (deterministic, no float atomics), stores, and resets the tile counter."""
        if SPLIT == 1:
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(ws_ptr + pid_s * slot + offs, acc, mask=mask)
            tl.debug_barrier()  # every thread's partials are written before the (cumulative) release below
            ticket = tl.atomic_add(lock_ptr, 1, sem="acq_rel")
            if ticket == SPLIT - 1:
                tot = tl.load(ws_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")  # .cg: from L2, not L1
                for s in range(1, SPLIT):
                    tot += tl.load(ws_ptr + s * slot + offs, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + offs, tot.to(out_ptr.dtype.element_ty), mask=mask)
                tl.store(lock_ptr, 0)

    @triton.jit(do_not_specialize=["M"])
    def _nf4_mm_kernel(a_ptr, packed_ptr, s_ptr, s2_ptr, code_ptr, code8_ptr, out_ptr, ws_ptr, lock_ptr,
                       M, N, K, s_am, s_ak, offset,
                       TRANS: tl.constexpr, BS: tl.constexpr, DQ: tl.constexpr, BM: tl.constexpr,
                       TN: tl.constexpr, TKB: tl.constexpr, SPLIT: tl.constexpr,
                       DOT_F32: tl.constexpr, BLOCKED: tl.constexpr, PAIRS: tl.constexpr):
        pid_o = tl.program_id(0)
        pid_s = tl.program_id(1)
        K2 = K // 2
        DTYPE = a_ptr.dtype.element_ty
        offs_m = tl.arange(0, BM)
        mmask = offs_m < M
        if not TRANS:  # y[m, n] = sum_k a[m, k] W[n, k]; this program: rows n, a 1/SPLIT share of k
            offs_n = pid_o * TN + tl.arange(0, TN)
            nmask = offs_n < N
            start, end = _share(K2, TKB, pid_s, SPLIT)
            acc = tl.full((TN, BM), 0.0, tl.float32)
            for kb0 in range(start, end, TKB):
                offs_kb = kb0 + tl.arange(0, TKB)
                kmask = offs_kb < K2
                hi, lo = _tile(packed_ptr, s_ptr, s2_ptr, code_ptr, code8_ptr, offset, offs_n, kb0, offs_kb, nmask,
                               kmask, K2, BS, DQ, DTYPE, DOT_F32, TKB, BLOCKED, PAIRS)
                amask = kmask[:, None] & mmask[None, :]
                a_even = a_ptr + offs_m[None, :] * s_am + (2 * offs_kb)[:, None] * s_ak  # [TKB, BM] = a^T
                xe = tl.load(a_even, mask=amask, other=0.0)
                xo = tl.load(a_even + s_ak, mask=amask, other=0.0)
                if DOT_F32:
                    xe = xe.to(tl.float32)
                    xo = xo.to(tl.float32)
                acc = tl.dot(hi, xe, acc)
                acc = tl.dot(lo, xo, acc)
            offs = offs_m[None, :] * N + offs_n[:, None]
            _finish(acc, out_ptr, ws_ptr, lock_ptr + pid_o, offs, mmask[None, :] & nmask[:, None], pid_s, M * N,
                    SPLIT)
        else:  # y[m, k] = sum_n a[m, n] W[n, k]; this program: byte-columns of W, a 1/SPLIT share of n
            offs_kb = pid_o * TKB + tl.arange(0, TKB)
            kmask = offs_kb < K2
            start, end = _share(N, TN, pid_s, SPLIT)
            acc_e = tl.full((BM, TKB), 0.0, tl.float32)
            acc_o = tl.full((BM, TKB), 0.0, tl.float32)
            for n0 in range(start, end, TN):
                offs_n = n0 + tl.arange(0, TN)
                nmask = offs_n < N
                hi, lo = _tile(packed_ptr, s_ptr, s2_ptr, code_ptr, code8_ptr, offset, offs_n, pid_o * TKB, offs_kb,
                               nmask, kmask, K2, BS, DQ, DTYPE, DOT_F32, TKB, BLOCKED, PAIRS)
                g = tl.load(a_ptr + offs_m[:, None] * s_am + offs_n[None, :] * s_ak,
                            mask=mmask[:, None] & nmask[None, :], other=0.0)
                if DOT_F32:
                    g = g.to(tl.float32)
                acc_e = tl.dot(g, hi, acc_e)
                acc_o = tl.dot(g, lo, acc_o)
            offs = offs_m[:, None] * K + 2 * offs_kb[None, :]
            _finish_pair(acc_e, acc_o, out_ptr, ws_ptr, lock_ptr + pid_o, offs, mmask[:, None] & kmask[None, :],
                         pid_s, M * K, SPLIT)

    @triton.jit
    def _finish_pair(acc_e, acc_o, out_ptr, ws_ptr, lock_ptr, offs, mask, pid_s, slot, SPLIT: tl.constexpr):
        """`_finish` for the backward tile, whose even / odd halves land interleaved at offs / offs + 1."""
        if SPLIT == 1:
            tl.store(out_ptr + offs, acc_e.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(out_ptr + offs + 1, acc_o.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(ws_ptr + pid_s * slot + offs, acc_e, mask=mask)
            tl.store(ws_ptr + pid_s * slot + offs + 1, acc_o, mask=mask)
            tl.debug_barrier()
            ticket = tl.atomic_add(lock_ptr, 1, sem="acq_rel")
            if ticket == SPLIT - 1:
                te = tl.load(ws_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
                to = tl.load(ws_ptr + offs + 1, mask=mask, other=0.0, cache_modifier=".cg")
                for s in range(1, SPLIT):
                    te += tl.load(ws_ptr + s * slot + offs, mask=mask, other=0.0, cache_modifier=".cg")
                    to += tl.load(ws_ptr + s * slot + offs + 1, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + offs, te.to(out_ptr.dtype.element_ty), mask=mask)
                tl.store(out_ptr + offs + 1, to.to(out_ptr.dtype.element_ty), mask=mask)
                tl.store(lock_ptr, 0)


    @triton.jit
    def _add(a, b):
        # tl.sum's own combine function is a jit function created at import: it cannot run under an interpreter
        # switched on after triton was imported (the CPU tests); this twin is created with the module
        return a + b

    @triton.jit(do_not_specialize=["M"])
    def _nf4_gemv_kernel(a_ptr, packed_ptr, s_ptr, s2_ptr, code_ptr, code8_ptr, out_ptr, ws_ptr, lock_ptr,
                         M, N, K, s_am, s_ak, offset,
                         BS: tl.constexpr, DQ: tl.constexpr, BM: tl.constexpr, TN: tl.constexpr, TKB: tl.constexpr,
                         SPLIT: tl.constexpr, PAIRS: tl.constexpr):
        """y = a @ W^T for a few rows without tl.dot: a tile of W is [TN rows, NB scale blocks, HB bytes], so each
        scale is loaded once per block (not per element) and broadcast; every row of `a` reuses the dequantized tile
        through an fp32 multiply-reduce. Needs K % BS == 0 (blocks never straddle rows) and TKB % (BS // 2) == 0."""
        pid_o = tl.program_id(0)
        pid_s = tl.program_id(1)
        K2 = K // 2
        DTYPE = a_ptr.dtype.element_ty
        offs_n = pid_o * TN + tl.arange(0, TN)
        nmask = offs_n < N
        offs_m = tl.arange(0, BM)
        start, end = _share(K2, TKB, pid_s, SPLIT)
        HB: tl.constexpr = BS // 2
        NB: tl.constexpr = TKB // HB
        acc = tl.full((TN, BM), 0.0, tl.float32)
        acc3 = tl.full((TN, NB, HB), 0.0, tl.float32)  # one row: reduce once at the end, not per step
        for kb0 in range(start, end, TKB):
            hi, lo, col, cmask = _load_w3(packed_ptr, s_ptr, s2_ptr, code_ptr, code8_ptr, offset, offs_n, kb0, nmask,
                                          K2, BS, DQ, DTYPE, TKB, PAIRS)
            hi = hi.to(tl.float32)
            lo = lo.to(tl.float32)
            for m in tl.static_range(BM):
                xm = a_ptr + m * s_am + (2 * col) * s_ak
                xmask = cmask & ((col * 0 + m) < M)
                xe = tl.load(xm, mask=xmask, other=0.0).to(tl.float32)
                xo = tl.load(xm + s_ak, mask=xmask, other=0.0).to(tl.float32)
                if BM == 1:
                    acc3 += hi * xe[None, :, :] + lo * xo[None, :, :]
                else:
                    part = tl.reduce(tl.reduce(hi * xe[None, :, :] + lo * xo[None, :, :], 2, _add), 1, _add)
                    acc += tl.where(offs_m[None, :] == m, part[:, None], 0.0)
        if BM == 1:
            acc += tl.reduce(tl.reduce(acc3, 2, _add), 1, _add)[:, None]
        offs = offs_m[None, :] * N + offs_n[:, None]
        _finish(acc, out_ptr, ws_ptr, lock_ptr + pid_o, offs, (offs_m < M)[None, :] & nmask[:, None], pid_s, M * N,
                SPLIT)


    @triton.jit
    def _nf4_gemv_t_kernel(a_ptr, packed_ptr, s_ptr, s2_ptr, code_ptr, code8_ptr, out_ptr, ws_ptr, lock_ptr,
                           N, K, s_ak, offset,
                           BS: tl.constexpr, DQ: tl.constexpr, TN: tl.constexpr, TKB: tl.constexpr,
                           SPLIT: tl.constexpr, PAIRS: tl.constexpr):
        """y = a @ W for one row a [1, N] (the input gradient of a one-token step): programs own TKB byte columns
        and reduce over the rows of W (a 1/SPLIT share of them), same 3-D tiles as the forward GEMV."""
        pid_o = tl.program_id(0)
        pid_s = tl.program_id(1)
        K2 = K // 2
        DTYPE = a_ptr.dtype.element_ty
        HB: tl.constexpr = BS // 2
        NB: tl.constexpr = TKB // HB
        kb0 = pid_o * TKB
        start, end = _share(N, TN, pid_s, SPLIT)
        acc_e = tl.full((TN, NB, HB), 0.0, tl.float32)  # reduced over the rows once, after the loop
        acc_o = tl.full((TN, NB, HB), 0.0, tl.float32)
        col = kb0 + tl.arange(0, NB)[:, None] * HB + tl.arange(0, HB)[None, :]
        for n0 in range(start, end, TN):
            offs_n = n0 + tl.arange(0, TN)
            nmask = offs_n < N
            hi, lo, col, cmask = _load_w3(packed_ptr, s_ptr, s2_ptr, code_ptr, code8_ptr, offset, offs_n, kb0, nmask,
                                          K2, BS, DQ, DTYPE, TKB, PAIRS)
            g = tl.load(a_ptr + offs_n * s_ak, mask=nmask, other=0.0).to(tl.float32)[:, None, None]
            acc_e += hi.to(tl.float32) * g
            acc_o += lo.to(tl.float32) * g
        _finish_pair(tl.reduce(acc_e, 0, _add), tl.reduce(acc_o, 0, _add), out_ptr, ws_ptr, lock_ptr + pid_o, 2 * col, col < K2, pid_s, K, SPLIT)


if triton is not None:  # repeat launches skip Triton's per-call argument binding (kernels/launch.py)
    from memfit.kernels.launch import Fast

    _GEMV_T, _GEMV, _MM = Fast(_nf4_gemv_t_kernel), Fast(_nf4_gemv_kernel), Fast(_nf4_mm_kernel)

_WS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_CONFIGS: dict[tuple, MMConfig] = {}
_SMS: dict[torch.device, int] = {}


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


def _sm_count(device: torch.device) -> int:
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return _SMS[device]


def _split(tiles: int, steps: int, sms: int) -> int:
    """~4 programs per SM, while the reduction still gets >= 2 steps per program."""
    return max(1, min(_pow2_floor(4 * sms / tiles), _pow2_floor(steps / 2), 64))


def gemv_ok(m: int, k: int, block_size: int, trans: bool) -> bool:
    """Whether the tensor-core-free kernels apply: forward with few rows or backward with one, and scale blocks that
    never straddle rows."""
    return m <= (1 if trans else GEMV_MAX_M) and k % block_size == 0


def candidate_configs(n: int, k: int, trans: bool, sms: int, m: int | None = None,
                      block_size: int = 64) -> list[MMConfig]:
    """Tile shapes to time, each with its `_split`: per-element-scale tl.dot tiles (any layout), or where scale blocks
    never straddle rows the blocked tl.dot tiles (faster in every shape measured) plus, for `gemv_ok` row counts, the
    tensor-core-free ones; the best of each kind also with 3 pipeline stages, with twice the split and shallow
    (`variants`)."""
    hb = block_size // 2

    def steps(cfg: MMConfig) -> int:
        return math.ceil(n / cfg.tn) if trans else math.ceil((k // 2) / cfg.tkb)

    def make(tn: int, tkb: int, warps: int, **kind: bool) -> MMConfig:
        tkb = max(tkb, hb) // hb * hb if (kind.get("blocked") or kind.get("gemv")) else tkb
        cfg = MMConfig(tn, tkb, 1, warps, **kind)
        tiles = math.ceil((k // 2) / tkb) if trans else math.ceil(n / tn)
        return replace(cfg, split=_split(tiles, steps(cfg), sms))

    def shallow(cfg: MMConfig) -> MMConfig:
        """(About) one loop step per program, every load issued up front: for few-row products bound by memory
        latency rather than bandwidth."""
        return replace(cfg, split=_pow2_floor(min(64, steps(cfg))))

    def variants(cfg: MMConfig) -> list[MMConfig]:
        """The config, with 3 pipeline stages, with twice the split, and shallow."""
        return list(dict.fromkeys([cfg, replace(cfg, stages=3), replace(cfg, split=min(64, 2 * cfg.split)),
                                   shallow(cfg)]))

    if k % block_size:
        return [make(tn, tkb, w) for tn, tkb, w in ((64, 128, 4), (64, 64, 4), (32, 128, 4), (64, 256, 8))]
    blocked = make(64, 128, 4, blocked=True)
    # pairs: both nibbles of a byte from one 8-byte gather of nf4_code_pairs (fewer instructions, a 2 KB table)
    # (32, 64): 72 registers instead of 200-255 (experiments/kernel_resources.py), so ~7 programs share an SM
    out = variants(blocked) + [make(64, 128, 8, blocked=True), replace(blocked, pairs=True),
                               make(32, 64, 4, blocked=True)]
    if m is not None and gemv_ok(m, k, block_size, trans):
        shapes = ((16, 128, 4), (64, 64, 4), (32, 64, 4)) if trans else ((16, 256, 4), (64, 64, 4), (64, 128, 8),
                                                                          (32, 128, 4))
        gemv = [make(tn, tkb, w, gemv=True) for tn, tkb, w in shapes]
        # wide tiles: a few rows (forward: about a row per warp) over 1 KB of each row per step, like bitsandbytes'
        # one-token kernel; plain and shallow
        wide = [make(tn, tkb, w, gemv=True) for tn, tkb, w in (((8, 512, 4),) if trans else ((4, 1024, 4),
                                                                                            (8, 1024, 8)))]
        out += variants(gemv[0]) + gemv[1:] + [c for cfg in wide for c in dict.fromkeys([cfg, shallow(cfg)])]
        out += [replace(gemv[0], pairs=True), replace(shallow(wide[0]), pairs=True)]
    return list(dict.fromkeys(out))


def _workspace(device: torch.device, n_out: int, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial-sum slots and zeroed int32 tile counters (kernels leave them zeroed), grown on demand."""
    ws, lock = _WS.get(device, (None, None))
    if ws is None or ws.numel() < n_out or lock.numel() < n_tiles:
        ws = torch.empty(max(n_out, 1 << 16, 0 if ws is None else ws.numel()), dtype=torch.float32, device=device)
        lock = torch.zeros(max(n_tiles, 4096, 0 if lock is None else lock.numel()), dtype=torch.int32, device=device)
        _WS[device] = (ws, lock)
    return ws, lock


def _launch(a: torch.Tensor, packed: torch.Tensor, scales: tuple[torch.Tensor, ...], offset: float | None,
            code8: torch.Tensor | None, n: int, k: int, block_size: int, trans: bool, cfg: MMConfig,
            out: torch.Tensor) -> torch.Tensor:
    m = a.shape[0]
    n_out = k if trans else n
    tiles = triton.cdiv(k // 2, cfg.tkb) if trans else triton.cdiv(n, cfg.tn)
    ws, lock = _workspace(a.device, cfg.split * m * n_out, tiles) if cfg.split > 1 else (out, out)
    dq = offset is not None
    if cfg.pairs and not (cfg.gemv or cfg.blocked):
        raise ValueError(f"config {cfg}: the pair-table lookup needs the GEMV or blocked tiles")
    table = nf4_code_pairs(a.device) if cfg.pairs else nf4_code(a.device)
    s = scales[0]
    s2 = scales[1] if dq else s
    if cfg.gemv:
        if not gemv_ok(m, k, block_size, trans) or cfg.tkb % (block_size // 2):
            raise ValueError(f"GEMV config {cfg} does not apply to m={m}, k={k}, block_size={block_size}, "
                             f"trans={trans}")
        if trans:
            _GEMV_T[(tiles, cfg.split)](
                a, packed, s, s2, table, code8 if dq else s, out, ws, lock,
                n, k, a.stride(1), float(offset or 0.0),
                BS=block_size, DQ=dq, TN=cfg.tn, TKB=cfg.tkb, SPLIT=cfg.split, PAIRS=cfg.pairs, num_warps=cfg.warps,
                num_stages=cfg.stages)
        else:
            _GEMV[(tiles, cfg.split)](
                a, packed, s, s2, table, code8 if dq else s, out, ws, lock,
                m, n, k, a.stride(0), a.stride(1), float(offset or 0.0),
                BS=block_size, DQ=dq, BM=triton.next_power_of_2(m), TN=cfg.tn, TKB=cfg.tkb, SPLIT=cfg.split,
                PAIRS=cfg.pairs, num_warps=cfg.warps, num_stages=cfg.stages)
        return out
    if cfg.blocked and (k % block_size or cfg.tkb % (block_size // 2)):
        raise ValueError(f"blocked config {cfg} needs in_features ({k}) a multiple of block_size ({block_size})")
    bm = max(16, triton.next_power_of_2(m))
    # the Triton interpreter (CPU tensors) mis-computes tl.dot on bf16 operands (triton 3.9: off by ~1e10): there the
    # operands, already rounded to bf16, are widened to fp32 (same products, exact in fp32); the GPU dots bf16
    dot_f32 = a.device.type != "cuda" and a.dtype == torch.bfloat16
    _MM[(tiles, cfg.split)](
        a, packed, s, s2, table, code8 if dq else s, out, ws, lock,
        m, n, k, a.stride(0), a.stride(1), float(offset or 0.0),
        TRANS=trans, BS=block_size, DQ=dq, BM=bm, TN=cfg.tn, TKB=cfg.tkb, SPLIT=cfg.split, DOT_F32=dot_f32,
        BLOCKED=cfg.blocked, PAIRS=cfg.pairs, num_warps=cfg.warps, num_stages=cfg.stages)
    return out


def _autotune(key: tuple, run: object, cands: list[MMConfig]) -> MMConfig:
    """Time each candidate once per (shape, direction, row bucket, dtype, device); keep the fastest."""
    from memfit.kernels.tune import tuned

    verbose = SETTINGS.nf4_verbose
    log = (lambda c, t: print(f"nf4_matmul autotune {key[:4]} {c}: {1000 * t:.1f} us", flush=True)) if verbose else None
    _CONFIGS[key] = tuned("nf4_matmul", key[:-1], cands, run, device=key[-1], source_file=__file__, log=log)
    return _CONFIGS[key]


def nf4_matmul(a: torch.Tensor, packed: torch.Tensor, scales: tuple[torch.Tensor, ...], offset: float | None,
               n: int, k: int, block_size: int, trans: bool = False, code8: torch.Tensor | None = None,
               config: MMConfig | None = None) -> torch.Tensor:
    """Fused a @ W^T (trans=False, a [M, K] -> [M, N]) or a @ W (trans=True, a [M, N] -> [M, K]) on an NF4 W [N, K].

    `scales` is (absmax fp32,) or, with double quantization (`offset` not None), (qabsmax uint8, absmax2 fp32) with
    `code8` the 256-entry dynamic code. `config` None: picked by timing on the first call per shape on CUDA (or a
    heuristic while a CUDA graph is being captured / with NF4_MM_AUTOTUNE=0)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use nf4_matmul_reference")
    if k % 2:
        raise ValueError(f"nf4_matmul needs an even in_features, got {k}")
    if a.dim() != 2 or a.shape[1] != (n if trans else k):
        raise ValueError(f"nf4_matmul: a has shape {tuple(a.shape)}, W is {n}x{k}, trans={trans}")
    if offset is not None and code8 is None:
        raise ValueError("nf4_matmul: double-quantized scales need `code8`")
    m = a.shape[0]
    out = torch.empty((m, k if trans else n), dtype=a.dtype, device=a.device)
    if m == 0:
        return out
    if config is None:
        key = (trans, n, k, triton.next_power_of_2(m), block_size, offset is not None, a.dtype, a.device)
        config = _CONFIGS.get(key)
        if config is None:
            cands = candidate_configs(n, k, trans, _sm_count(a.device), m, block_size)
            if (a.is_cuda and not torch.cuda.is_current_stream_capturing()
                    and SETTINGS.nf4_autotune):
                config = _autotune(key, lambda c: _launch(a, packed, scales, offset, code8, n, k, block_size,
                                                          trans, c, out), cands)
            else:
                config = cands[0]
    return _launch(a, packed, scales, offset, code8, n, k, block_size, trans, config, out)
