"""FM-Delta codec, torch reference and container against independent Python-int references: symbols and raw bits of
each element computed with `struct` and big ints from the definition (order-preserving key, wrapping W-bit difference,
leading-one index, exponent context), the packed bit stream built block by block, and the container's bytes from its
documented layout. Written to kill the mutants experiments/mutation.py found surviving."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
import torch

from memfit.compression import container
from memfit.compression.container import ContainerError, DeltaReader, DeltaWriter
from memfit.kernels import fmdelta as fmdelta_codec
from memfit.kernels.ans import ANSEncoded, ans_decode
from memfit.kernels.fmdelta import decode_delta, encode_delta, payload_stats
from memfit.kernels.fmdelta import reference as fmdelta_ref

# dtype -> (struct float code, width, exponent shift, exponent mask): IEEE layouts, written out here
LAYOUT = {torch.float32: (32, 23, 0xFF), torch.float16: (16, 10, 0x1F), torch.bfloat16: (16, 7, 0xFF),
          torch.float64: (64, 52, 0x7FF)}


def _u(t: torch.Tensor) -> list[int]:
    """Unsigned bit patterns of a float tensor's elements (from its raw little-endian bytes)."""
    w = LAYOUT[t.dtype][0] // 8
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return [int.from_bytes(raw[i:i + w], "little") for i in range(0, len(raw), w)]


def _signed(u: int, w: int) -> int:
    return u - (1 << w) if u >> (w - 1) else u


def _key(u: int, w: int) -> int:
    s = _signed(u, w)
    return s ^ ((1 << (w - 1)) - 1) if s < 0 else s


def spec(base: torch.Tensor, ft: torch.Tensor, context: bool) -> tuple[list[int], list[int], list[int]]:
    """(symbols, k, low) per element from the definition."""
    w, shift, mask = LAYOUT[base.dtype]
    mask = mask if context else 0
    syms, ks, lows = [], [], []
    for ub, uf in zip(_u(base), _u(ft)):
        d = _signed((_key(uf, w) - _key(ub, w)) % (1 << w), w)
        if d == 0:
            syms.append(0), ks.append(0), lows.append(0)
            continue
        mag = abs(d)
        k = mag.bit_length() - 1
        t = (k + ((ub >> shift) & mask)) % w
        syms.append(1 + (w if d < 0 else 0) + t)
        ks.append(k)
        lows.append(mag - (1 << k))
    return syms, ks, lows


def packed(ks: list[int], lows: list[int], block: int) -> tuple[list[int], bytes]:
    """(words per block, raw-bit bytes): each block's raw bits LSB-first from a fresh 64-bit word."""
    counts, out = [], b""
    for a in range(0, len(ks), block):
        acc = pos = 0
        for k, low in zip(ks[a:a + block], lows[a:a + block]):
            acc |= low << pos
            pos += k
        nw = -(-pos // 64)
        counts.append(nw)
        out += acc.to_bytes(8 * nw, "little")
    return counts, out


def _pair(dtype: torch.dtype, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g, dtype=torch.float64) * torch.logspace(-6, 3, n, dtype=torch.float64))
    ft = base + torch.randn(n, generator=g, dtype=torch.float64) * 1e-3
    base, ft = base.to(dtype), ft.to(dtype)
    ft[::7] = base[::7]  # zero deltas
    ft[3] = -base[3]  # sign flips
    ft[5] = 0.0
    base[6] = -0.0
    return base, ft


@pytest.mark.parametrize("dtype", list(LAYOUT))
@pytest.mark.parametrize("context", [True, False])
def test_codec_payload_equals_spec(dtype, context):
    base, ft = _pair(dtype, 1000, 1)
    block = 128
    meta, parts = encode_delta(base, ft, context=context, block=block, segment=4 * block)
    syms, ks, lows = spec(base, ft, context)
    assert meta["codec"] == "fmdelta" and meta["context"] is context and meta["block"] == block
    assert meta["segment"] == 4 * block
    assert [s[0] for s in meta["segments"]] == [512, 488]
    for i, a in enumerate(range(0, 1000, 4 * block)):
        ans, bw, wb = parts[3 * i: 3 * i + 3]
        assert meta["segments"][i][1:] == [len(ans), len(bw), len(wb)]
        enc = ANSEncoded.from_bytes(ans)
        assert enc.prob_bits == 12
        assert ans_decode(enc).tolist() == syms[a:a + 4 * block]
        counts, raw = packed(ks[a:a + 4 * block], lows[a:a + 4 * block], block)
        assert bytes(bw) == struct.pack(f"<{len(counts)}i", *counts)
        assert bytes(wb) == raw
    payload = b"".join(bytes(p) for p in parts)
    out = decode_delta(base, meta, payload)
    assert out.dtype == dtype and torch.equal(out.view(-1).view(torch.uint8), ft.view(-1).view(torch.uint8))
    stats = payload_stats(meta, payload, 1000)
    assert stats == {"symbol_bytes": sum(s[1] for s in meta["segments"]),
                     "raw_bytes": sum(s[2] + s[3] for s in meta["segments"])}
    assert stats["symbol_bytes"] + stats["raw_bytes"] == len(payload)


@pytest.mark.parametrize("dtype", list(LAYOUT))
def test_reference_equals_spec(dtype):
    base, ft = _pair(dtype, 700, 2)
    w, shift, mask = LAYOUT[dtype]
    ib = base.view(fmdelta_ref.SIGNED[w // 8])
    iff = ft.view(fmdelta_ref.SIGNED[w // 8])
    syms, ks, lows = spec(base, ft, True)
    sym, k, low = fmdelta_ref.symbolise(ib, iff, shift, mask)
    assert sym.tolist() == syms and k.tolist() == ks and low.tolist() == lows
    for block in (64, 100, 1 << 16):
        s2, bw, words = fmdelta_ref.encode(ib, iff, shift, mask, block)
        counts, raw = packed(ks, lows, block)
        assert s2.tolist() == syms and bw.tolist() == counts
        assert words.numpy().astype("<i8").tobytes() == raw
        assert fmdelta_ref.k_from_symbols(ib, sym, shift, mask).tolist() == ks
        back = fmdelta_ref.decode(ib, sym, bw, words, shift, mask, block)
        assert torch.equal(back, iff)
    with pytest.raises(ValueError, match="alphabet"):
        fmdelta_ref.k_from_symbols(ib[:1], torch.tensor([2 * w + 1], dtype=torch.uint8), shift, mask)
    fmdelta_ref.k_from_symbols(ib[:1], torch.tensor([2 * w], dtype=torch.uint8), shift, mask)  # the last symbol
    bad = bw.clone()
    bad[0] += 1
    with pytest.raises(ValueError, match="does not match"):
        fmdelta_ref.unpack(k, words, bad, 1 << 16)


def test_reference_extreme_deltas():
    # wrapping differences of the largest magnitudes, every raw-bit count 0..W-1, and a 64-bit -2^63 difference
    for dtype, itype in [(torch.float32, torch.int32), (torch.float64, torch.int64), (torch.float16, torch.int16)]:
        w, shift, mask = LAYOUT[dtype]
        lo, hi = torch.iinfo(itype).min, torch.iinfo(itype).max
        base_i = torch.tensor([0, hi, lo, -1, 1, 0] + [0] * w, dtype=itype)
        ft_i = torch.tensor([hi, lo, hi, 0, -1, lo] + [(1 << j) + (j % 2) for j in range(w - 1)] + [hi], dtype=itype)
        base, ft = base_i.view(dtype), ft_i.view(dtype)
        syms, ks, lows = spec(base, ft, True)
        sym, k, low = fmdelta_ref.symbolise(base_i, ft_i, shift, mask)
        assert sym.tolist() == syms and k.tolist() == ks and low.tolist() == lows, dtype
        s2, bw, words = fmdelta_ref.encode(base_i, ft_i, shift, mask, 8)
        counts, raw = packed(ks, lows, 8)
        assert bw.tolist() == counts and words.numpy().astype("<i8").tobytes() == raw
        assert torch.equal(fmdelta_ref.decode(base_i, sym, bw, words, shift, mask, 8), ft_i)
        meta, parts = encode_delta(base, ft, block=8, segment=64)
        assert torch.equal(decode_delta(base, meta, b"".join(bytes(p) for p in parts)).view(itype), ft_i)


def test_msb64_known_answers():
    # (2^63 - 1 and 2^63 - 512 round up to 2^63 in float64: still index 62)
    vals = [1, 2, 3, 4, 7, 8, (1 << 53) - 1, (1 << 53) + 1, (1 << 62) - 1, 1 << 62, (1 << 63) - 512, (1 << 63) - 513,
            (1 << 63) - 1, -(1 << 63)]
    expected = [0, 1, 1, 2, 2, 3, 52, 53, 61, 62, 62, 62, 62, 63]
    assert fmdelta_ref.msb64(torch.tensor(vals, dtype=torch.int64)).tolist() == expected


def test_codec_checks():
    base, ft = _pair(torch.float32, 300, 3)
    assert fmdelta_codec.delta_codable(base, ft)
    assert not fmdelta_codec.delta_codable(None, ft)
    assert not fmdelta_codec.delta_codable(base.double(), ft)
    assert not fmdelta_codec.delta_codable(base[:-1], ft[:-1].reshape(-1)[:298])
    assert not fmdelta_codec.delta_codable(base.reshape(3, 100), ft)
    assert not fmdelta_codec.delta_codable(base.int(), ft.int())
    with pytest.raises(ValueError, match="cannot delta-code"):
        encode_delta(base, ft.double())
    with pytest.raises(ValueError, match="multiple of block"):
        encode_delta(base, ft, block=64, segment=100)
    meta, parts = encode_delta(base, ft, block=64, segment=128)
    payload = b"".join(bytes(p) for p in parts)
    with pytest.raises(ValueError, match="dtype"):
        decode_delta(base.int(), meta, payload)
    for bad in [{"block": 0}, {"block": fmdelta_codec.MAX_BLOCK + 1}, {"block": 64.0}, {"context": 1},
                {"block": True}]:
        with pytest.raises(ValueError, match="corrupt FM-Delta meta"):
            decode_delta(base, {**meta, **bad}, payload)
    ok = {**meta, "block": fmdelta_codec.MAX_BLOCK}  # the largest block accepted is MAX_BLOCK itself
    with pytest.raises(ValueError):  # (then the payload no longer fits that block size)
        decode_delta(base, ok, payload)
    segs = meta["segments"]
    for bad in [None, [segs[0][:3]] + segs[1:], [[segs[0][0], -1, 0, 0]] + segs[1:], [[1.0] + segs[0][1:]] + segs[1:],
                [(1, 2, 3, 4)]]:
        with pytest.raises(ValueError, match="segment table"):
            decode_delta(base, {**meta, "segments": bad}, payload)
    with pytest.raises(ValueError, match="truncated"):
        decode_delta(base, meta, payload[:-1])
    with pytest.raises(ValueError, match="covers"):
        decode_delta(base, meta, payload + b"\0")
    with pytest.raises(ValueError):
        decode_delta(base[:200], meta, payload)
    # the block table of the first segment: raw-bit words must add up and stay below the per-block maximum
    n0, la, lb, lw = segs[0]
    bw = bytearray(payload[la:la + lb])
    bw[:4] = struct.pack("<i", -1)
    with pytest.raises(ValueError, match="block table"):
        decode_delta(base, meta, payload[:la] + bytes(bw) + payload[la + lb:])
    with pytest.raises(ValueError, match="wrong size"):
        decode_delta(base, {**meta, "segments": [[n0, la, lb - 4, lw + 4]] + segs[1:]}, payload)
    assert payload_stats(meta, payload, 300)["symbol_bytes"] == sum(s[1] for s in segs)


def test_codec_max_words_bound_is_one_full_block():
    # a block whose every element needs W-1 raw bits is the largest legal block: accepted, decoded exactly
    n, block = 64, 64
    base_i = torch.zeros(n, dtype=torch.int16)
    ft_i = torch.full((n,), -1, dtype=torch.int16)  # key difference -2^15: 15 raw bits each
    base, ft = base_i.view(torch.float16), ft_i.view(torch.float16)
    meta, parts = encode_delta(base, ft, block=block, segment=block)
    n0, la, lb, lw = meta["segments"][0]
    assert lw == 8 * ((block * 15 + 63) // 64)
    assert torch.equal(decode_delta(base, meta, b"".join(bytes(p) for p in parts)).view(torch.int16), ft_i)


def _container_bytes(header: dict, records: list[tuple[dict, bytes]], footer: dict | None = None) -> bytes:
    """The container's bytes from its documented layout."""
    def js(o):
        return json.dumps(o, separators=(",", ":"), sort_keys=True).encode()
    h = js(header)
    out = b"FMDELTA\0" + struct.pack("<II", 1, len(h)) + h + struct.pack("<I", zlib.crc32(h))
    index = []
    for meta, payload in records:
        m = js(meta)
        index.append({"kind": meta.get("kind"), "name": meta.get("name"), "offset": len(out)})
        out += b"REC\0" + struct.pack("<IQ", len(m), len(payload)) + m + payload
        out += struct.pack("<I", zlib.crc32(m + payload))
    idx = js({**(footer or {}), "records": index})
    body = b"END\0" + struct.pack("<I", len(idx)) + idx + struct.pack("<I", zlib.crc32(idx))
    return out + body + struct.pack("<Q", len(body)) + b"FMDELTA\0"


RECORDS = [({"kind": "tensor", "name": "a.weight"}, b"\x01\x02\x03"), ({"kind": "raw", "name": "b"}, b""),
           ({"name": "c", "z": 1}, bytes(range(200)))]


def test_container_bytes_equal_layout(tmp_path):
    expected = _container_bytes({"base": "fp", "n": 3}, RECORDS, {"fingerprint": "x"})
    buf = io.BytesIO()
    w = DeltaWriter(buf, {"base": "fp", "n": 3})
    for meta, payload in RECORDS:
        w.add(meta, [payload[:1], payload[1:]])
    w.footer["fingerprint"] = "x"
    w.close()
    w.close()  # a second close writes nothing
    assert buf.getvalue() == expected
    path = tmp_path / "d.fmd"
    with DeltaWriter(path, {"base": "fp", "n": 3}) as w2:
        for meta, payload in RECORDS:
            w2.add(meta, (payload,))
        w2.footer["fingerprint"] = "x"
    assert path.read_bytes() == expected
    for src in (path, str(path), io.BytesIO(expected)):
        with DeltaReader(src) as r:
            assert r.header == {"base": "fp", "n": 3} and r.footer["fingerprint"] == "x"
            assert r.data_start == 8 + 8 + len(b'{"base":"fp","n":3}') + 4
            got = [(m, bytes(p)) for m, p in r]
        assert got == RECORDS
    stream = io.BytesIO(expected)
    DeltaReader(stream).close()
    assert not stream.closed  # a caller's stream stays open


def test_container_writer_abort_and_error_leave_nothing(tmp_path):
    path = tmp_path / "d.fmd"
    w = DeltaWriter(path, {})
    w.add({"name": "a"}, [b"x"])
    w.abort()
    w.close()
    assert not path.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with DeltaWriter(path, {}) as w:
            w.add({"name": "a"}, [b"x"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    buf = io.BytesIO()
    with pytest.raises(RuntimeError):
        with DeltaWriter(buf, {}) as w:
            raise RuntimeError("boom")
    assert w.closed and buf.getvalue() == _container_bytes({}, [])[:8 + 8 + 2 + 4]


def _reseal_footer(data: bytes, index: dict) -> bytes:
    (size,) = struct.unpack_from("<Q", data, len(data) - 16)
    start = len(data) - 16 - size
    idx = json.dumps(index, separators=(",", ":"), sort_keys=True).encode()
    body = b"END\0" + struct.pack("<I", len(idx)) + idx + struct.pack("<I", zlib.crc32(idx))
    return data[:start] + body + struct.pack("<Q", len(body)) + b"FMDELTA\0"


def test_container_reader_rejects(tmp_path):
    good = _container_bytes({"h": 1}, RECORDS)
    hlen = len(b'{"h":1}')

    def read(data: bytes):
        with DeltaReader(io.BytesIO(data)) as r:
            return list(r)

    assert len(read(good)) == 3
    cases = [
        (b"FMDELTA\1" + good[8:], "bad magic"),
        (good[:8] + struct.pack("<I", 2) + good[12:], "version 2"),
        (good[:16 + hlen] + b"\0\0\0\0" + good[20 + hlen:], "header is corrupt"),
        (good[:20 + hlen + 10], "truncated"),
        (good[:-8] + b"FMDELTA\1", "no end marker"),
        (good[:-16] + struct.pack("<Q", 11) + b"FMDELTA\0", "no end marker"),
        (good[:-16] + struct.pack("<Q", len(good)) + b"FMDELTA\0", "no end marker"),
    ]
    (size,) = struct.unpack_from("<Q", good, len(good) - 16)
    start = len(good) - 16 - size
    cases.append((good[:start] + b"XND\0" + good[start + 4:], "footer index is corrupt"))
    cases.append((good[:start + 8] + b"[" + good[start + 9:], "footer index is corrupt"))
    cases.append((_reseal_footer(good, {"records": [{"offset": 1.5}]}), "no valid record list"))
    cases.append((_reseal_footer(good, {"records": "x"}), "no valid record list"))
    cases.append((_reseal_footer(good, {"records": [{"offset": 8}]}), "index says 8"))
    first = 20 + hlen
    cases.append((_reseal_footer(good, {"records": [{"offset": first}]}), "between the last record and the footer"))
    rec = bytearray(good)
    rec[first + 8: first + 16] = struct.pack("<Q", 10**6)
    cases.append((bytes(rec), "header is corrupt"))
    rec = bytearray(good)
    rec[first] = ord("X")
    cases.append((bytes(rec), "header is corrupt"))
    rec = bytearray(good)
    rec[first + 16 + len(b'{"kind":"tensor","name":"a.weight"}')] ^= 1
    cases.append((bytes(rec), "corrupt \\(checksum mismatch\\)"))
    for data, match in cases:
        with pytest.raises(ContainerError, match=match):
            read(data)
    # a footer claiming exactly the space after the header is the largest accepted
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError):
        DeltaReader(tmp_path / "dir")
    assert container.load_json_object(b'{"a":1}', "x") == {"a": 1}
    for raw, match in [(b"[1]", "not a JSON object"), (b"{", "not valid JSON"), (b"[" * 100000, "not valid JSON")]:
        with pytest.raises(ContainerError, match=match):
            container.load_json_object(raw, "x")


def test_cpu_dispatch_native_and_reference_fallback(monkeypatch):
    from memfit.kernels.fmdelta import native as fmdelta_native

    base, ft = _pair(torch.float32, 5000, 8)
    payload = b"".join(bytes(p) for p in encode_delta(base, ft, block=2048, segment=4096)[1])
    calls = []
    enc, dec = fmdelta_native.encode, fmdelta_native.decode
    monkeypatch.setattr(fmdelta_native, "encode", lambda *a, **k: calls.append("enc") or enc(*a, **k))
    monkeypatch.setattr(fmdelta_native, "decode", lambda *a, **k: calls.append("dec") or dec(*a, **k))
    meta, parts = encode_delta(base, ft, block=2048, segment=4096)
    assert torch.equal(decode_delta(base, meta, b"".join(bytes(p) for p in parts)), ft)
    assert calls == ["enc", "enc", "dec", "dec"]  # CPU tensors go to the compiled codec, one call per segment
    # without the compiled library: the torch reference, same bytes (no GPU code on CPU tensors)
    monkeypatch.setattr(fmdelta_native, "library", lambda: None)
    meta2, parts2 = encode_delta(base, ft, block=2048, segment=4096)
    assert meta2 == meta and b"".join(bytes(p) for p in parts2) == payload
    assert torch.equal(decode_delta(base, meta, payload), ft)
    assert calls == ["enc", "enc", "dec", "dec"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_one_element_blocks(dtype):
    # block = 1: each block holds at most W-1 raw bits, i.e. exactly the largest word count a block may have
    base, ft = _pair(dtype, 40, 9)
    meta, parts = encode_delta(base, ft, block=1, segment=8)
    syms, ks, lows = spec(base, ft, True)
    counts, raw = packed(ks, lows, 1)
    assert b"".join(bytes(p) for p in parts[2::3]) == raw
    assert torch.equal(decode_delta(base, meta, b"".join(bytes(p) for p in parts)).view(-1).view(torch.uint8),
                       ft.view(-1).view(torch.uint8))


def test_block_table_sum_and_footer_size_checks():
    base, ft = _pair(torch.float32, 300, 10)
    meta, parts = encode_delta(base, ft, block=64, segment=320)
    payload = b"".join(bytes(p) for p in parts)
    n0, la, lb, lw = meta["segments"][0]
    table = list(struct.unpack(f"<{lb // 4}i", payload[la:la + lb]))
    for i, delta in [(0, 1), (len(table) - 1, -1)]:  # every entry in range, the total one word off
        bad = table.copy()
        bad[i] += delta
        if not 0 <= bad[i] <= (64 * 32 + 63) // 64:
            continue
        raw = payload[:la] + struct.pack(f"<{len(bad)}i", *bad) + payload[la + lb:]
        with pytest.raises(ValueError, match="block table does not match"):
            decode_delta(base, meta, raw)
    # a footer of exactly 12 bytes (END, a zero length, a checksum): parsed, and rejected for its empty index
    good = _container_bytes({"h": 1}, [])
    (size,) = struct.unpack_from("<Q", good, len(good) - 16)
    start = len(good) - 16 - size
    body = b"END\0" + struct.pack("<I", 0) + struct.pack("<I", zlib.crc32(b""))
    with pytest.raises(ContainerError, match="not valid JSON"):
        DeltaReader(io.BytesIO(good[:start] + body + struct.pack("<Q", 12) + b"FMDELTA\0"))


def test_largest_block_is_two_to_the_26():
    # the decoder's block limit: block_words of a full block must fit 32 bits
    base, ft = _pair(torch.float32, 10, 11)
    meta, parts = encode_delta(base, ft, block=64, segment=64)
    payload = b"".join(bytes(p) for p in parts)
    assert fmdelta_codec._check_codec_meta({**meta, "block": 1 << 26}) == (1 << 26, True)
    with pytest.raises(ValueError, match="corrupt FM-Delta meta"):
        decode_delta(base, {**meta, "block": (1 << 26) + 1}, payload)
