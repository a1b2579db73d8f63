"""NeuZipTensor's serialised form against its documented layout (header fields, checksum, shape, exponent symbols and
sign/mantissa planes computed with Python ints from the IEEE bits), the header checks, and the FSDP2 gather paths
against the dense weight. Written to kill the mutants experiments/mutation.py found surviving."""

from __future__ import annotations

import math
import struct
import types
import zlib

import pytest
import torch
import torch.nn.functional as F

from memfit.kernels.ans import ANSEncoded, ans_decode
from memfit.quant import neuzip
from memfit.quant.neuzip import NeuZipTensor, gather_dense, lane_length, shard_rows

HEAD = "<4sBBBBIQQQI"  # magic, version, dtype code, mantissa bits, ndim, block, ans bytes, packed bytes, scales, crc
HSIZE = struct.calcsize(HEAD)
LAYOUT = {torch.bfloat16: (0, 16, 7), torch.float16: (1, 16, 10), torch.float32: (2, 32, 23)}  # code, bits, mantissa


def _u(t: torch.Tensor) -> list[int]:
    w = t.element_size()
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return [int.from_bytes(raw[i:i + w], "little") for i in range(0, len(raw), w)]


def _planes(vals: list[int], width: int) -> bytes:
    """Whole low byte planes first, then the remaining bits of 8 values at a time in `width % 8` bytes."""
    out = b""
    for p in range(width // 8):
        out += bytes((v >> (8 * p)) & 0xFF for v in vals)
    r, top = width % 8, [v >> (8 * (width // 8)) for v in vals]
    if r:
        for a in range(0, len(top), 8):
            word = sum(v << (i * r) for i, v in enumerate(top[a:a + 8]))
            out += word.to_bytes(r, "little")
    return out


def _weight(dtype: torch.dtype, shape=(6, 9), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[-1])).to(dtype)


@pytest.mark.parametrize("dtype", list(LAYOUT))
@pytest.mark.parametrize("shape", [(6, 9), (3, 2, 5), (17,)])
def test_lossless_bytes_follow_the_layout(dtype, shape):
    w = _weight(dtype, shape)
    z = NeuZipTensor.from_dense(w)
    buf = z.to_bytes()
    code, bits, man = LAYOUT[dtype]
    magic, ver, dcode, k, ndim, block, na, npk, nsc, crc = struct.unpack_from(HEAD, buf)
    assert (magic, ver, dcode, k, ndim, block, nsc) == (b"NZIP", 2, code, man, len(shape), 0, 0)
    assert crc == zlib.crc32(buf[HSIZE:], zlib.crc32(buf[:HSIZE - 4] + b"\0\0\0\0"))
    assert struct.unpack_from(f"<{ndim}q", buf, HSIZE) == shape
    pos = HSIZE + 8 * ndim
    assert len(buf) == pos + na + npk == z.compressed_nbytes
    u = _u(w)
    exps = ans_decode(ANSEncoded.from_bytes(buf[pos:pos + na])).tolist()
    assert exps == [(x >> man) & ((1 << (bits - 1 - man)) - 1) for x in u]
    signman = [((x >> (bits - 1)) << man) | (x & ((1 << man) - 1)) for x in u]
    assert buf[pos + na:] == _planes(signman, 1 + man)
    assert npk == len(_planes(signman, 1 + man))
    back = NeuZipTensor.from_bytes(buf)
    assert back.shape == w.shape and back.dtype == dtype
    assert torch.equal(back.dequantize().view(torch.uint8), w.view(torch.uint8))


def test_lossy_block_scales_section():
    w = _weight(torch.float32, (4, 10), 1)
    w[1] = 0.0  # an all-zero block keeps scale 1
    z = NeuZipTensor.from_dense(w, 3, block=10)
    buf = z.to_bytes()
    magic, ver, dcode, k, ndim, block, na, npk, nsc, crc = struct.unpack_from(HEAD, buf)
    assert (k, block, nsc) == (3, 10, 4)
    assert len(buf) == HSIZE + 16 + na + npk + 16 == z.compressed_nbytes
    scales = struct.unpack_from("<4f", buf, len(buf) - 16)
    for row, s in zip(w.double(), scales):
        amax = float(row.abs().max())
        expected = 1.0 if amax == 0 else 2 * math.frexp(amax)[0]  # absmax / 2**floor(log2(absmax)), in [1, 2)
        assert s == pytest.approx(expected, rel=1e-7)
    back = NeuZipTensor.from_bytes(buf)
    assert back.block == 10 and torch.equal(back.dequantize(), z.dequantize())
    # 3 mantissa bits kept: relative error of each weight at most 2**-4 of its block-normalised magnitude
    assert torch.allclose(z.dequantize(), w, rtol=2 ** -4, atol=0)


def _reseal(buf: bytes, body: bytes | None = None, version: int = 2, **fields) -> bytes:
    names = ["magic", "ver", "dcode", "k", "ndim", "block", "na", "npk", "nsc", "crc"]
    h = dict(zip(names, struct.unpack_from(HEAD, buf)))
    h.update(fields, ver=version)
    body = buf[HSIZE:] if body is None else body
    vals = list(h.values())[:-1]
    head_crc = 0 if version == 1 else zlib.crc32(struct.pack(HEAD, *vals, 0))
    return struct.pack(HEAD, *vals, zlib.crc32(body, head_crc)) + body


def test_header_checks():
    w = _weight(torch.bfloat16, (3, 3))
    buf = NeuZipTensor.from_dense(w).to_bytes()
    v1 = _reseal(buf, version=1)  # v1: the checksum covers the body only
    assert torch.equal(NeuZipTensor.from_bytes(v1).dequantize(), w)
    with pytest.raises(ValueError, match="checksum"):
        NeuZipTensor.from_bytes(v1[:HSIZE - 4] + struct.pack("<I", zlib.crc32(buf[HSIZE:], 1)) + buf[HSIZE:])
    with pytest.raises(ValueError, match="not a NeuZip"):
        NeuZipTensor.from_bytes(_reseal(buf, version=3))
    with pytest.raises(ValueError, match="not a NeuZip"):
        NeuZipTensor.from_bytes(_reseal(buf, magic=b"NZIQ"))
    with pytest.raises(ValueError, match="dtype code 3"):
        NeuZipTensor.from_bytes(_reseal(buf, dcode=3))
    assert NeuZipTensor.from_bytes(_reseal(buf, dcode=1)).dtype == torch.float16  # codes name bf16, fp16, fp32
    with pytest.raises(ValueError, match="mantissa_bits"):
        NeuZipTensor.from_bytes(_reseal(buf, k=8))
    body = buf[HSIZE:]
    na, npk = struct.unpack_from(HEAD, buf)[6:8]
    with pytest.raises(ValueError, match="header describes"):
        NeuZipTensor.from_bytes(_reseal(buf, body + b"\0"))
    # a 10-element shape over a 9-symbol exponent stream
    with pytest.raises(ValueError, match="holds 9 symbols"):
        NeuZipTensor.from_bytes(_reseal(buf, struct.pack("<2q", 2, 5) + body[16:]))
    # a sign/mantissa section one byte longer than 9 elements need
    with pytest.raises(ValueError, match="sign/mantissa"):
        NeuZipTensor.from_bytes(_reseal(buf, body + b"\0", npk=npk + 1))
    lossy = NeuZipTensor.from_dense(w, 2, block=4).to_bytes()
    nsc = struct.unpack_from(HEAD, lossy)[8]
    assert nsc == 3  # ceil(9 / 4): the last block is partial
    assert torch.equal(NeuZipTensor.from_bytes(lossy).dequantize(), NeuZipTensor.from_dense(w, 2, block=4).dequantize())
    with pytest.raises(ValueError, match="block scales"):
        NeuZipTensor.from_bytes(_reseal(lossy, lossy[HSIZE:] + b"\0\0\0\0", nsc=4))


def test_gather_dense_rank_parts():
    w = _weight(torch.float16, (8, 7), 2)
    for kw in ({}, {"mantissa_bits": 4, "block": 7}):
        shards = shard_rows(w, 2, **kw)
        outs = [s.fsdp_pre_all_gather(None) for s in shards]
        meta = outs[0][1]
        assert meta[0] == 28 and meta[3] == (10 if not kw else 4) and meta[4] == kw.get("block")
        gathered = tuple(torch.cat([o[0][i] for o in outs]) for i in range(len(outs[0][0])))
        expected = torch.cat([s.dequantize() for s in shards]).reshape(-1)
        dense = gather_dense(gathered, meta, torch.float16)
        assert torch.equal(dense.view(torch.int16), expected.view(torch.int16))
        out = torch.empty(56, dtype=torch.float16)
        assert gather_dense(gathered, meta, torch.float16, out) is out
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
        wrong = torch.empty(56, dtype=torch.float32)
        other = gather_dense(gathered, meta, torch.float16, wrong)
        assert other is not wrong and torch.equal(other.view(torch.int16), expected.view(torch.int16))
        for i in (1, 3):  # offsets / frequency tables of the wrong length
            bad = tuple(t[:-1] if j == i else t for j, t in enumerate(gathered))
            with pytest.raises(ValueError, match="do not match"):
                gather_dense(bad, meta, torch.float16)


def test_one_rank_shortcut_and_param_dtype():
    w = _weight(torch.bfloat16, (4, 6), 3)
    z = NeuZipTensor.from_dense(w)
    inputs, meta = z.fsdp_pre_all_gather(None)
    dense, inner = z.fsdp_post_all_gather(inputs[:1], meta)  # FSDP2 on one rank: only the first input comes back
    assert torch.equal(dense.view(w.shape), w) and inner[0] is dense
    as32, _ = z.fsdp_post_all_gather(inputs[:1], meta, torch.float32)
    assert as32.dtype == torch.float32 and torch.equal(as32.view(w.shape), w.float())
    same, _ = z.fsdp_post_all_gather(inputs[:1], meta, torch.bfloat16)
    assert same.dtype == torch.bfloat16
    out = torch.zeros(4, 6, dtype=torch.bfloat16)
    assert z.fsdp_post_all_gather(inputs[:1], meta, out=out) is None and torch.equal(out, w)
    out32 = torch.zeros(4, 6, dtype=torch.float32)  # another dtype: decoded apart, then copied in
    assert z.fsdp_post_all_gather(inputs[:1], meta, out=out32) is None and torch.equal(out32, w.float())
    noncontig = torch.zeros(6, 4, dtype=torch.bfloat16).T
    assert z.fsdp_post_all_gather(inputs[:1], meta, out=noncontig) is None and torch.equal(noncontig, w)


def test_pre_all_gather_checks():
    w = _weight(torch.float32, (4, 3), 4)
    z = NeuZipTensor.from_dense(w)
    mesh = types.SimpleNamespace(size=lambda: 2)
    inputs, meta = z.fsdp_pre_all_gather(mesh, (8, 3))
    assert inputs[3].numel() == 256 and inputs[3].dtype == torch.int32  # table padded to 256 entries
    assert torch.equal(inputs[3][: z.enc.freqs.numel()], z.enc.freqs.to(torch.int32))
    assert meta == (12, z.enc.lanes, z.enc.prob_bits, 23, None, z.enc.words.numel())
    with pytest.raises(NotImplementedError, match="divisible"):
        z.fsdp_pre_all_gather(mesh, (9, 3))
    z._s.fsdp_pad_to = z.enc.words.numel() + 5
    inputs, meta = z.fsdp_pre_all_gather(None)
    assert inputs[0].numel() == z.enc.words.numel() + 5 and meta[-1] == z.enc.words.numel() + 5
    assert int(inputs[0][-5:].abs().sum()) == 0
    z._s.fsdp_pad_to = z.enc.words.numel() - 1
    with pytest.raises(ValueError, match="fsdp_pad_to"):
        z.fsdp_pre_all_gather(None)
    lossy = NeuZipTensor.from_dense(w, 5, block=4)
    inputs, meta = lossy.fsdp_pre_all_gather(None)
    assert len(inputs) == 6 and torch.equal(inputs[5], lossy.scales)


def test_linear_dispatch_passes_bias(monkeypatch):
    w = _weight(torch.float32, (3, 4), 5)
    z = NeuZipTensor.from_dense(w)
    calls = []
    monkeypatch.setattr(NeuZipTensor, "linear_impl", lambda x, wt, b: calls.append(b) or x @ wt.dequantize().T)
    x, b = torch.randn(2, 4), torch.randn(3)
    F.linear(x, z)
    F.linear(x, z, b)
    F.linear(x, z, bias=b)
    assert calls[0] is None and calls[1] is b and calls[2] is b
    monkeypatch.setattr(NeuZipTensor, "linear_impl", None)
    assert torch.allclose(F.linear(x, z, b), x @ w.T + b)


def test_lane_length_setting():
    assert lane_length({}) == neuzip.SYMBOLS_PER_LANE == 256
    assert lane_length({"symbols_per_lane": 1}) == 1
    with pytest.raises(ValueError, match=">= 1"):
        lane_length({"symbols_per_lane": 0})
    z = NeuZipTensor.from_dense(torch.randn(1000))
    assert z.enc.lanes == 4  # ceil(1000 / 256)


def test_one_rank_shortcut_into_another_dtype_keeps_the_weight_dtype_rounding():
    # block-scaled lossy weights: the rescaled values are rounded to the weight's dtype (bf16) before they land in an
    # fp32 `out`, exactly as dequantize() gives them
    w = _weight(torch.bfloat16, (4, 6), 6)
    z = NeuZipTensor.from_dense(w, 3, block=4)
    inputs, meta = z.fsdp_pre_all_gather(None)
    out32 = torch.zeros(4, 6, dtype=torch.float32)
    assert z.fsdp_post_all_gather(inputs[:1], meta, out=out32) is None
    expected = z.dequantize()
    assert torch.equal(out32, expected.float())
    assert torch.equal(out32.to(torch.bfloat16).float(), out32)  # every value is bf16-representable
