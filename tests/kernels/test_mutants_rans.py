"""rANS coder against an independent scalar encoder and serialiser written from kernels/ans/__init__.py's docstring (Python
ints and `struct`, no code shared with the coder), plus the frequency quantiser's known answers and the header and
table validation edges. Written to kill the mutants experiments/mutation.py found surviving."""

from __future__ import annotations

import itertools
import math
import struct
import zlib

import pytest
import torch

from memfit.kernels.ans import ANSEncoded, ans_decode, ans_encode, quantize_frequencies
from memfit.kernels.ans import native as ans_cpu

L = 1 << 16
HEADER = "<4sBBHQIHHI"  # magic, version, prob_bits, flags, n, lanes, alphabet, reserved, crc32(body)


def scalar_encode(symbols: list[int], freqs: list[int], lanes: int, prob_bits: int) -> tuple[list[int], list[int], list[int]]:
    """(words in decode order, per-lane word counts, final states) from the docstring's state machine."""
    cum = [sum(freqs[:i]) for i in range(len(freqs))]
    words, counts, states = [], [], []
    for j in range(lanes):
        x, emitted = L, []
        for i in reversed(range(j, len(symbols), lanes)):
            s = symbols[i]
            f, c = freqs[s], cum[s]
            if x >= (1 << (32 - prob_bits)) * f:
                emitted.append(x & 0xFFFF)
                x >>= 16
            x = ((x // f) << prob_bits) | ((x % f) + c)
        words += emitted[::-1]
        counts.append(len(emitted))
        states.append(x)
    return words, counts, states


def scalar_bytes(symbols: list[int], freqs: list[int], lanes: int, prob_bits: int) -> bytes:
    """The serialised form, from the docstring's layout."""
    words, counts, states = scalar_encode(symbols, freqs, lanes, prob_bits)
    n = len(symbols)
    small = -(-n // lanes) < (1 << 16)
    bitmap = bytearray(-(-len(freqs) // 8))
    for i, f in enumerate(freqs):
        if f:
            bitmap[i // 8] |= 1 << (i % 8)
    body = bytes(bitmap) + b"".join(struct.pack("<H", f - 1) for f in freqs if f)
    body += b"".join(struct.pack("<H" if small else "<I", c) for c in counts)
    body += b"".join(struct.pack("<I", s) for s in states) + b"".join(struct.pack("<H", w) for w in words)
    return struct.pack(HEADER, b"rANS", 1, prob_bits, int(small), n, lanes, len(freqs), 0, zlib.crc32(body)) + body


def _resealed(buf: bytes, body: bytes | None = None, **fields) -> bytes:
    """`buf` with header fields replaced and the body's checksum recomputed (so only the tested check can fire)."""
    names = ["magic", "version", "prob_bits", "flags", "n", "lanes", "alphabet", "reserved", "crc"]
    head = dict(zip(names, struct.unpack_from(HEADER, buf)))
    body = buf[struct.calcsize(HEADER):] if body is None else body
    head.update(fields, crc=zlib.crc32(body))
    return struct.pack(HEADER, *head.values()) + body


def _data(n: int, alphabet: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, alphabet, (n,), generator=g).tolist()


CASES = [  # (symbols, freqs, lanes, prob_bits)
    (_data(50, 2, 1), [1, 1], 3, 1),
    (_data(301, 3, 2), [3000, 1000, 96], 7, 12),
    ([0] * 40, [1 << 12], 1, 12),  # alphabet of one symbol: zero bits each
    (_data(700, 256, 3), [256] * 256, 5, 16),
    (_data(257, 4, 4), [40000, 20000, 5000, 536], 2, 16),
    ([3, 1, 3, 3, 1], [0, 1, 0, 3], 2, 2),  # zeros in the table (bitmap gaps)
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_bytes_equal_scalar_spec_encoder(case):
    symbols, freqs, lanes, prob_bits = CASES[case]
    expected = scalar_bytes(symbols, freqs, lanes, prob_bits)
    x = torch.tensor(symbols, dtype=torch.uint8)
    enc = ans_encode(x, torch.tensor(freqs, dtype=torch.int32), lanes=lanes, prob_bits=prob_bits)
    assert enc.to_bytes() == expected
    assert enc.nbytes == len(expected)
    back = ANSEncoded.from_bytes(expected)
    assert (back.n, back.lanes, back.prob_bits) == (len(symbols), lanes, prob_bits)
    assert back.freqs.tolist() == freqs
    assert ans_decode(back).tolist() == symbols


def test_word_counts_switch_to_u32_at_65536_symbols_per_lane():
    # all-zero symbols with a one-symbol table cost no words: cheap streams of any length
    for n, lanes, small in [(65535, 1, 1), (65536, 1, 0), (131070, 2, 1), (131071, 2, 0)]:
        x = torch.zeros(n, dtype=torch.uint8)
        buf = ans_encode(x, torch.tensor([4096], dtype=torch.int32), lanes=lanes).to_bytes()
        assert struct.unpack_from(HEADER, buf)[3] == small, (n, lanes)
        assert len(buf) == 28 + 1 + 2 + (2 if small else 4) * lanes + 4 * lanes
        assert torch.equal(ans_decode(ANSEncoded.from_bytes(buf)), x)


def test_u32_word_counts_hold_more_than_65535_words():
    # 8 bits/symbol in one lane: ~70000 words, a count a u16 field cannot hold
    symbols = _data(140_000, 256, 5)
    freqs = [16] * 256
    expected = scalar_bytes(symbols, freqs, 1, 12)
    enc = ans_encode(torch.tensor(symbols, dtype=torch.uint8), torch.tensor(freqs, dtype=torch.int32), lanes=1)
    assert enc.words.numel() > 65535
    assert enc.to_bytes() == expected and enc.nbytes == len(expected)
    assert ans_decode(ANSEncoded.from_bytes(expected)).tolist() == symbols


def test_header_edges_accepted():
    for symbols, freqs, lanes, prob_bits in [([1, 0, 1], [1, 1], 1, 1), ([5] * 9, [0] * 5 + [1 << 16], 2, 16),
                                             ([255, 0], [1] * 255 + [1], 2, 8)]:
        buf = scalar_bytes(symbols, freqs, lanes, prob_bits)
        assert ans_decode(ANSEncoded.from_bytes(buf)).tolist() == symbols


def test_header_and_body_validation():
    buf = scalar_bytes(_data(100, 3, 6), [2000, 2000, 96], 4, 12)
    head = struct.calcsize(HEADER)
    body = buf[head:]
    ANSEncoded.from_bytes(buf)
    for fields in [{"prob_bits": 0}, {"prob_bits": 17}, {"alphabet": 0}, {"alphabet": 257}, {"lanes": 0},
                   {"flags": 2}]:
        with pytest.raises(ValueError, match="corrupt rANS header"):
            ANSEncoded.from_bytes(_resealed(buf, **fields))
    with pytest.raises(ValueError, match="version"):
        ANSEncoded.from_bytes(_resealed(buf, version=2))
    with pytest.raises(ValueError, match="trailing"):
        ANSEncoded.from_bytes(_resealed(buf, body + b"\0\0"))
    # frequency table: bitmap (1 byte) then (freq - 1) u16; make the first entry one larger
    bad = body[:1] + struct.pack("<H", 2000) + body[3:]
    with pytest.raises(ValueError, match="sums to"):
        ANSEncoded.from_bytes(_resealed(buf, bad))
    # lane states after bitmap (1), freqs (6) and counts (4 lanes x u16): set one below L
    at = 1 + 6 + 8
    bad = body[:at] + struct.pack("<I", L - 1) + body[at + 4:]
    with pytest.raises(ValueError, match="normalisation"):
        ANSEncoded.from_bytes(_resealed(buf, bad))
    ok = body[:at] + struct.pack("<I", L) + body[at + 4:]
    ANSEncoded.from_bytes(_resealed(buf, ok))  # L itself is a valid state (decoding then fails, not parsing)


def test_decode_rejects_inconsistent_fields():
    x = torch.tensor(_data(64, 3, 7), dtype=torch.uint8)
    enc = ans_encode(x, lanes=4)
    with pytest.raises(ValueError, match="int16"):
        ans_decode(ANSEncoded(enc.words.to(torch.int32), enc.lane_offsets, enc.final_states, enc.freqs, enc.n,
                              enc.lanes, enc.prob_bits))
    with pytest.raises(ValueError, match="offsets"):
        ans_decode(ANSEncoded(enc.words, enc.lane_offsets[:-1], enc.final_states, enc.freqs, enc.n, enc.lanes,
                              enc.prob_bits))
    with pytest.raises(ValueError, match="offsets"):
        ans_decode(ANSEncoded(enc.words, enc.lane_offsets, enc.final_states[:-1], enc.freqs, enc.n, enc.lanes,
                              enc.prob_bits))
    with pytest.raises(ValueError, match="do not match"):
        ans_decode(ANSEncoded(enc.words[:-1], enc.lane_offsets, enc.final_states, enc.freqs, enc.n, enc.lanes,
                              enc.prob_bits))


def test_frequency_table_checks():
    x = torch.tensor([0, 1, 1], dtype=torch.uint8)
    for bad in [torch.tensor([2048.0, 2048.0]), torch.full((2, 2), 1024, dtype=torch.int32),
                torch.ones(257, dtype=torch.int32), torch.tensor([4097, -1], dtype=torch.int32),
                torch.tensor([2048, 2047], dtype=torch.int32), torch.empty(0, dtype=torch.int32)]:
        with pytest.raises(ValueError, match="freqs"):
            ans_encode(x, bad)
    full = torch.full((256,), 16, dtype=torch.int32)  # 256 entries is allowed
    assert torch.equal(ans_decode(ans_encode(x, full)), x)


def test_encode_argument_checks():
    x = torch.tensor([1, 2, 3], dtype=torch.uint8)
    for pb in (0, 17):
        with pytest.raises(ValueError, match="prob_bits"):
            ans_encode(x, prob_bits=pb)
    with pytest.raises(ValueError, match="lanes"):
        ans_encode(x, lanes=0)
    for pb in (1, 16):  # the ends of the range work (table from the histogram)
        y = torch.tensor([0, 1, 1, 0], dtype=torch.uint8)
        assert torch.equal(ans_decode(ans_encode(y, prob_bits=pb)), y)
    # one symbol whose value is not 0: the histogram's table, not the empty stream's one-entry table
    one = torch.tensor([7], dtype=torch.uint8)
    enc = ans_encode(one)
    assert enc.freqs.tolist() == [0] * 7 + [4096] and ans_decode(enc).tolist() == [7]
    empty = ans_encode(torch.empty(0, dtype=torch.uint8))
    assert empty.freqs.tolist() == [4096] and ans_decode(empty).numel() == 0


def _brute_force(counts: list[int], m: int) -> float:
    used = [i for i, c in enumerate(counts) if c]
    return min(sum(counts[i] * -math.log2(f / m) for i, f in zip(used, comp))
               for comp in itertools.product(range(1, m + 1), repeat=len(used)) if sum(comp) == m)


def _cost(counts: list[int], f: list[int], m: int) -> float:
    return sum(c * -math.log2(q / m) for c, q in zip(counts, f) if c)


@pytest.mark.parametrize("counts, prob_bits, expected", [
    ([1000, 1, 1, 1], 2, [1, 1, 1, 1]),  # floor shares overshoot: units removed down to the floor of 1
    ([50, 1, 1, 1, 1, 1], 3, [3, 1, 1, 1, 1, 1]),
    ([5, 0, 0], 1, [2, 0, 0]),  # unused symbols take no slot
    ([7], 12, [4096]),
    ([0, 0, 9, 0], 4, [0, 0, 16, 0]),
    ([1, 3], 1, [1, 1]),
    ([1, 1, 1, 97], 4, [1, 1, 1, 13]),
])
def test_quantize_frequencies_known_answers(counts, prob_bits, expected):
    f = quantize_frequencies(torch.tensor(counts), prob_bits).tolist()
    assert f == expected
    assert _cost(counts, f, 1 << prob_bits) <= _brute_force(counts, 1 << prob_bits) + 1e-9


def test_quantize_frequencies_removal_is_optimal():
    # many rare symbols next to frequent ones: the floored shares exceed 2**prob_bits and units must go
    for counts in ([40, 30, 1, 1, 1, 1], [9, 9, 9, 1, 1, 1, 1], [100, 60, 2, 1, 1, 1]):
        f = quantize_frequencies(torch.tensor(counts), 3).tolist()
        assert sum(f) == 8 and all((q >= 1) == (c > 0) for q, c in zip(f, counts))
        assert _cost(counts, f, 8) <= _brute_force(counts, 8) + 1e-9, (counts, f)


def test_quantize_frequencies_argument_edges():
    assert quantize_frequencies(torch.ones(256, dtype=torch.int64), 8).tolist() == [1] * 256
    assert quantize_frequencies(torch.tensor([3, 1]), 16).sum() == 1 << 16
    for bad in [torch.ones(257, dtype=torch.int64), torch.ones((2, 2), dtype=torch.int64),
                torch.empty(0, dtype=torch.int64)]:
        with pytest.raises(ValueError, match="1-D"):
            quantize_frequencies(bad)
    with pytest.raises(ValueError, match="prob_bits"):
        quantize_frequencies(torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="non-negative"):
        quantize_frequencies(torch.tensor([3, -1]))
    with pytest.raises(ValueError, match="do not fit"):
        quantize_frequencies(torch.tensor([1, 1, 1]), 1)


def test_cpu_coder_errors_and_helpers(monkeypatch):
    x = torch.tensor([0, 1, 0, 9, 1], dtype=torch.uint8)
    table = torch.zeros(10, dtype=torch.int32)
    table[0], table[1] = 2048, 2048
    with pytest.raises(ValueError, match="symbol 9 at index 3 "):
        ans_encode(x, table, lanes=2)
    bits = ans_cpu.to_i32_bits(torch.tensor([0, 2**31 - 1, 2**31, 2**32 - 1, 65536], dtype=torch.int64))
    assert bits.dtype == torch.int32 and bits.tolist() == [0, 2**31 - 1, -(2**31), -1, 65536]
    y = torch.tensor(_data(5000, 256, 8), dtype=torch.uint8)
    expected = [0] * 256
    for s in y.tolist():
        expected[s] += 1
    assert ans_cpu.histogram(y).tolist() == expected
    # threads: one per 2**18 elements of work, capped by torch's setting and the idle cores
    monkeypatch.setattr(ans_cpu, "idle_cores", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert [ans_cpu.cpu_threads(w) for w in (0, 10, (1 << 18) - 1, 1 << 18, (2 << 18) - 1, 2 << 18, 100 << 18)] == \
        [1, 1, 1, 1, 1, 2, 8]
    assert ans_cpu.cpu_threads(10 << 10, min_per_thread=1 << 10) == 8


def test_quantize_frequencies_rare_symbols_start_at_one_slot():
    # floored shares below 2**prob_bits: units are added, so a rare symbol must start from 1 slot, not more
    for counts in ([1, 100, 100], [1, 1, 50, 60], [2, 3, 200, 150, 90]):
        f = quantize_frequencies(torch.tensor(counts), 4).tolist()
        assert sum(f) == 16 and f[0] == 1
        assert _cost(counts, f, 16) <= _brute_force(counts, 16) + 1e-9, (counts, f)


def test_thread_count_with_tiny_shares(monkeypatch):
    # min_per_thread of 1 (or 0, read as 1): one thread per element, up to the cap
    monkeypatch.setattr(ans_cpu, "idle_cores", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert [ans_cpu.cpu_threads(w, min_per_thread=1) for w in (1, 3, 5, 20)] == [1, 3, 5, 8]
    assert ans_cpu.cpu_threads(3, min_per_thread=0) == 3


def test_documented_defaults():
    # ~2048 symbols per lane by default, probabilities quantised to 12 bits by default
    from memfit.kernels.ans import default_lanes

    assert [default_lanes(n) for n in (0, 1, 2048, 2049, 4096, 4097)] == [1, 1, 1, 2, 2, 3]
    assert default_lanes(100, 7) == 15
    assert ans_encode(torch.zeros(4097, dtype=torch.uint8)).lanes == 3
    assert int(quantize_frequencies(torch.tensor([3, 1])).sum()) == 4096
    assert ans_encode(torch.tensor([0, 1, 1], dtype=torch.uint8)).prob_bits == 12


def test_prob_bits_above_16_refused_with_a_given_table():
    x = torch.tensor([0, 1], dtype=torch.uint8)
    with pytest.raises(ValueError, match="prob_bits"):
        ans_encode(x, torch.tensor([1 << 16, 1 << 16], dtype=torch.int32), prob_bits=17)
