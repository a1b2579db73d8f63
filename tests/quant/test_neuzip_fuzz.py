"""NeuZip buffers from untrusted files (issue 17): a seeded, bounded fuzz of truncated and mutated `to_bytes()`
buffers, directly and inside a torch.save checkpoint. Each must raise ValueError with a message, or (for bits the
decoder never reads, e.g. the mantissa-bits field of an empty tensor) decode to the original bit for bit.

Format v2's crc32 covers the header too (v1 left the dtype code and block size unchecked, so flipping them decoded
to another tensor); v1 buffers still read."""

from __future__ import annotations

import io
import random
from collections import Counter

import pytest
import torch
from untrusted import specials

from memfit.quant.neuzip import NeuZipTensor

SEED = 17
UNPROTECTED: set[int] = set()  # v2: every byte is under the checksum (v1 left the dtype code and block size out)
STATS: Counter = Counter()


def tensors() -> list[tuple[torch.Tensor, int | None, int | None]]:
    g = torch.Generator().manual_seed(SEED)
    w = torch.randn(40, 24, generator=g).bfloat16()
    w[0, :10] = specials(torch.bfloat16)
    return [(w, None, None), (torch.randn(300, generator=g), 3, 16), (torch.randn(17, 5, generator=g).half(), None,
            None), (torch.empty(0, 4, dtype=torch.bfloat16), None, None), (torch.tensor(-0.0, dtype=torch.bfloat16),
            None, None)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def check(buf: bytes, ref: torch.Tensor) -> None:
    STATS["cases"] += 1
    try:
        d = NeuZipTensor.from_bytes(buf).dequantize()
    except ValueError as e:
        assert str(e)
        STATS["refused"] += 1
        return
    assert d.dtype == ref.dtype and d.shape == ref.shape and torch.equal(bits(d), bits(ref)), "accepted other data"
    STATS["identical"] += 1


def test_truncated_and_mutated_buffers() -> None:
    rng = random.Random(SEED)
    for w, k, block in tensors():
        z = NeuZipTensor.from_dense(w, k, block=block)
        buf, ref = z.to_bytes(), z.dequantize()
        cuts = range(len(buf)) if len(buf) < 400 else rng.sample(range(len(buf)), 150)
        for n in cuts:
            check(buf[:n], ref)
        for _ in range(250):
            b = bytearray(buf)
            pos = rng.choice([p for p in range(len(b)) if p not in UNPROTECTED])
            if rng.random() < 0.8:
                b[pos] ^= 1 << rng.randrange(8)
            else:
                b[pos:pos + 4] = rng.randbytes(4)
            check(bytes(b), ref)
        for pad in (b"\0", b"x" * 9):
            check(buf + pad, ref)
    print(f"\nNeuZip fuzz: {STATS['cases']} buffers, {STATS['refused']} clean refusals, "
          f"{STATS['identical']} decoded to the original")


def test_mutated_checkpoint_fails_in_torch_load() -> None:
    rng = random.Random(SEED + 1)
    z = NeuZipTensor.from_dense(tensors()[0][0])
    buf = z.to_bytes()
    out = io.BytesIO()
    torch.save({"w": z}, out)
    data = out.getvalue()
    at = data.find(buf)  # a uint8 storage, stored raw in the zip
    assert at > 0
    for _ in range(30):
        b = bytearray(data)
        b[at + rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        STATS["cases"] += 1
        with pytest.raises(ValueError, match="NeuZip|rANS"):
            torch.load(io.BytesIO(bytes(b)), weights_only=True)
        STATS["refused"] += 1


def test_header_fields_are_checked() -> None:
    z = NeuZipTensor.from_dense(tensors()[0][0])
    b = bytearray(z.to_bytes())
    for pos in (5, 8, 9, 10, 11):  # dtype code (bf16 <-> fp16), block size
        c = bytearray(b)
        c[pos] ^= 1
        with pytest.raises(ValueError, match="checksum mismatch"):
            NeuZipTensor.from_bytes(bytes(c))


def test_version_1_buffers_still_read() -> None:
    """A v1 buffer (crc32 over the body only) decodes to the same tensor, bit for bit."""
    import struct
    import zlib

    w = tensors()[0][0]
    b = bytearray(NeuZipTensor.from_dense(w).to_bytes())
    head = struct.Struct("<4sBBBBIQQQI")
    fields = list(head.unpack_from(b))
    fields[1], fields[-1] = 1, zlib.crc32(bytes(b[head.size:]))
    b[: head.size] = head.pack(*fields)
    assert torch.equal(NeuZipTensor.from_bytes(bytes(b)).dequantize().view(torch.int16), w.view(torch.int16))
