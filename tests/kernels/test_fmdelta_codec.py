"""FM-Delta codec: bit-exact round trips (all float dtypes, adversarial values), native == torch reference bytes,
symbols against an independent pure-Python implementation of the paper's definition."""

from __future__ import annotations

import pytest
import torch

from memfit.kernels.fmdelta import FORMATS, decode_delta, encode_delta
from memfit.kernels.fmdelta import native as fmdelta_native
from memfit.kernels.fmdelta import reference as fmdelta_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(FORMATS[t.dtype].int_dtype)


def adversarial(dtype: torch.dtype, n: int = 6000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Base and fine-tuned tensors mixing small deltas, identical values, specials and unrelated random bits."""
    g = torch.Generator().manual_seed(seed)
    it = FORMATS[dtype].int_dtype
    base = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    ft = (base.double() * (1 + 1e-3 * torch.randn(n, generator=g, dtype=torch.float64))).to(dtype)
    ft[:500] = base[:500]  # identical
    info = torch.finfo(dtype)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), info.tiny / 4, -info.tiny / 8,
                             info.max, -info.max, info.tiny, 1.0, -1.0], dtype=dtype)
    ft[500:500 + len(specials)] = specials
    base[520:520 + len(specials)] = specials
    ft[520:520 + len(specials)] = specials.flip(0)
    lo, hi = torch.iinfo(it).min, torch.iinfo(it).max
    rb = torch.randint(lo, hi, (2000,), generator=g, dtype=torch.int64).to(it)
    ftb, bb = bits(ft).clone(), bits(base).clone()
    ftb[1000:3000] = rb  # unrelated bits: huge deltas, NaN payloads, subnormals
    bb[2000:2500] = rb[:500].flip(0)
    ftb[3000] = (bb[3000] ^ torch.tensor(lo, dtype=it))  # sign flip of the raw bits
    ftb[3001], bb[3001] = torch.tensor(lo, dtype=it), torch.tensor(hi, dtype=it)  # extreme wrap-around
    ftb[3002], bb[3002] = torch.tensor(hi, dtype=it), torch.tensor(lo, dtype=it)
    return bb.view(dtype), ftb.view(dtype)


def py_symbol(b: int, f: int, width: int, shift: int, mask: int) -> tuple[int, int, int]:
    """The paper's definition on Python ints: unsigned order-preserving keys, wrapped difference, (sign, msb)."""
    m = (1 << width) - 1
    b, f = b & m, f & m
    sign = 1 << (width - 1)

    def key(x: int) -> int:
        return (~x) & m if x & sign else x | sign

    d = (key(f) - key(b)) & m
    if d == 0:
        return 0, 0, 0
    neg = d >> (width - 1)
    mag = ((1 << width) - d) if neg else d
    k = mag.bit_length() - 1
    ctx = (b >> shift) & mask
    return 1 + neg * width + (k + ctx) % width, k, mag - (1 << k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("context", [False, True])
def test_round_trip_bit_exact(dtype: torch.dtype, context: bool) -> None:
    base, ft = adversarial(dtype)
    meta, parts = encode_delta(base, ft, context=context, block=1024, segment=4096)
    out = decode_delta(base, meta, b"".join(parts))
    assert out.dtype == dtype and out.shape == ft.shape
    assert torch.equal(bits(out), bits(ft))


@pytest.mark.parametrize("dtype", DTYPES)
def test_symbols_match_python_definition(dtype: torch.dtype) -> None:
    fmt = FORMATS[dtype]
    base, ft = adversarial(dtype, n=4000, seed=1)
    b, f = bits(base), bits(ft)
    idx = list(range(0, 4000, 7)) + list(range(3000, 3003))
    for mask in (0, fmt.exp_mask):
        sym, k, low = fmdelta_ref.symbolise(b, f, fmt.exp_shift, mask)
        for i in idx:
            want = py_symbol(int(b[i]), int(f[i]), fmt.width, fmt.exp_shift, mask)
            assert (int(sym[i]), int(k[i]), int(low[i]) & ((1 << 64) - 1)) == want, (dtype, i)


@pytest.mark.skipif(fmdelta_native.library() is None, reason="no C++ compiler: the native path is not built")
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_equals_reference_bytes(dtype: torch.dtype) -> None:
    fmt = FORMATS[dtype]
    base, ft = adversarial(dtype, n=9000, seed=2)
    b, f = bits(base), bits(ft)
    ref = fmdelta_ref.encode(b, f, fmt.exp_shift, fmt.exp_mask, 1024)
    nat = fmdelta_native.encode(b, f, fmt.exp_shift, fmt.exp_mask, 1024)
    for x, y in zip(ref, nat):
        assert torch.equal(x, y)
    sym, bw, words = nat
    assert torch.equal(fmdelta_ref.decode(b, sym, bw, words, fmt.exp_shift, fmt.exp_mask, 1024), f)
    assert torch.equal(fmdelta_native.decode(b, sym, bw, words, fmt.exp_shift, fmt.exp_mask, 1024), f)


@pytest.mark.skipif(fmdelta_native.library() is None, reason="no C++ compiler: the native path is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("block,threads", [(8, 3), (1000, 2), (1024, 5), (4096, 1)])
def test_native_single_pass_threads_and_counts(dtype: torch.dtype, block: int, threads: int) -> None:
    """Blocks coded by threads as they come are compacted in order: bytes equal the reference for odd block sizes and
    thread counts (including more threads than blocks), the in-pass histogram equals a bincount of the symbols, and
    the threaded decoder inverts it."""
    fmt = FORMATS[dtype]
    base, ft = adversarial(dtype, n=9001, seed=4)
    b, f = bits(base), bits(ft)
    ref = fmdelta_ref.encode(b, f, fmt.exp_shift, fmt.exp_mask, block)
    counts = torch.zeros(256, dtype=torch.int64)
    nat = fmdelta_native.encode(b, f, fmt.exp_shift, fmt.exp_mask, block, counts, nthreads=threads)
    for x, y in zip(ref, nat, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(counts, torch.bincount(ref[0].to(torch.int64), minlength=256))
    dec = fmdelta_native.decode(b, nat[0], nat[1], nat[2], fmt.exp_shift, fmt.exp_mask, block, nthreads=threads)
    assert torch.equal(dec, f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_from_unaligned_payload(dtype: torch.dtype) -> None:
    """Container records put the raw-bit stream at any byte offset; decoding reads it in place."""
    base, ft = adversarial(dtype, seed=5)
    meta, parts = encode_delta(base, ft, block=1024, segment=4096)
    for pad in range(1, 8):
        view = memoryview(b"\0" * pad + b"".join(parts))[pad:]
        assert torch.equal(bits(decode_delta(base, meta, view)), bits(ft))


def test_identical_tensor_costs_almost_nothing() -> None:
    base = torch.randn(100_000)
    meta, parts = encode_delta(base, base.clone())
    assert sum(map(len, parts)) < 1000
    assert torch.equal(decode_delta(base, meta, b"".join(parts)), base)


def test_small_deltas_compress_and_context_helps() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200_000, generator=g) * torch.logspace(-3, 0, 200_000)
    ft = base + 1e-5 * torch.randn(200_000, generator=g).sign()  # Adam-like: the same step whatever the size
    sizes = {}
    for ctx in (False, True):
        meta, parts = encode_delta(base, ft, context=ctx)
        sizes[ctx] = sum(map(len, parts)) / (4 * base.numel())
        assert torch.equal(decode_delta(base, meta, b"".join(parts)), ft)
    assert sizes[False] < 0.75 and sizes[True] < sizes[False] - 0.02, sizes


def test_empty_and_scalar_tensors() -> None:
    for base in (torch.empty(0), torch.tensor(3.5), torch.empty(0, 7, dtype=torch.bfloat16)):
        ft = base + 1
        meta, parts = encode_delta(base, ft)
        out = decode_delta(base, meta, b"".join(parts))
        assert out.shape == ft.shape and torch.equal(out, ft)


def test_corrupt_payload_is_rejected() -> None:
    base, ft = adversarial(torch.float32)
    meta, parts = encode_delta(base, ft)
    payload = bytearray(b"".join(parts))
    with pytest.raises(ValueError, match="truncated|shorter|segment"):
        decode_delta(base, meta, bytes(payload[:-9]))
    bad = dict(meta, segments=[[meta["segments"][0][0] + 1, *meta["segments"][0][1:]]])
    with pytest.raises(ValueError):
        decode_delta(base, bad, bytes(payload))
    payload[len(parts[0]) + 2] ^= 0xFF  # inside the block table: words no longer match the symbols
    with pytest.raises(ValueError, match="corrupt"):
        decode_delta(base, meta, bytes(payload))


def test_wrong_dtype_or_shape_refused() -> None:
    with pytest.raises(ValueError, match="cannot delta-code"):
        encode_delta(torch.randn(4), torch.randn(5))
    with pytest.raises(ValueError, match="cannot delta-code"):
        encode_delta(torch.randn(4), torch.randn(4).half())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_round_trip_matches_cpu_bytes(dtype: torch.dtype) -> None:
    """Same layout -> same bytes on both devices; each device's default layout decodes on the other."""
    from memfit.kernels.fmdelta import SEGMENT

    base, ft = adversarial(dtype, n=300_000, seed=3)
    same = {"segment": SEGMENT, "symbols_per_lane": 2048}
    meta_c, parts_c = encode_delta(base, ft, **same)
    meta_g, parts_g = encode_delta(base.cuda(), ft.cuda(), **same)
    assert meta_c == meta_g and b"".join(parts_c) == b"".join(parts_g)
    for b, m, blob in ((base.cuda(), *encode_delta(base, ft)), (base, *encode_delta(base.cuda(), ft.cuda()))):
        out = decode_delta(b, m, b"".join(blob))
        assert out.device == b.device and torch.equal(bits(out.cpu()), bits(ft))
