"""rANS coder: round trips, bytes identical across the C++ / torch-reference / Triton-interpreter paths, a scalar
decoder written from the docstring's spec, near-entropy sizes, and rejection of bad input."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

from memfit.kernels import ans
from memfit.kernels.ans import ANSEncoded, ans_decode, ans_encode, quantize_frequencies
from memfit.kernels.ans import native as ans_cpu
from memfit.kernels.ans import reference as ans_ref


def _skewed(n: int, seed: int = 0, spread: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * spread).round().clamp(-20, 20).add(20).to(torch.uint8)


def _entropy(x: torch.Tensor) -> float:
    p = torch.bincount(x.long(), minlength=256).double()
    p = p[p > 0] / x.numel()
    return float(-(p * p.log2()).sum())


def _scalar_decode(enc: ANSEncoded) -> list[int]:
    """Independent decoder written from the module docstring with Python ints, one lane at a time."""
    m = 1 << enc.prob_bits
    freqs = enc.freqs.tolist()
    cum = [sum(freqs[:i]) for i in range(len(freqs))]
    words = [w & 0xFFFF for w in enc.words.tolist()]
    out = [0] * enc.n
    for j in range(enc.lanes):
        x, p = int(enc.final_states[j]), int(enc.lane_offsets[j])
        for i in range(j, enc.n, enc.lanes):
            slot = x % m
            s = next(k for k in range(len(freqs)) if cum[k] <= slot < cum[k] + freqs[k])
            out[i] = s
            x = freqs[s] * (x // m) + slot - cum[s]
            if x < 1 << 16:
                x = (x << 16) | words[p]
                p += 1
        assert x == 1 << 16 and p == int(enc.lane_offsets[j + 1])
    return out


def test_quantize_frequencies_matches_brute_force_optimum():
    m_bits = 4
    for counts in ([5, 1, 1], [100, 3, 0, 1], [7, 7, 7], [1, 0, 0, 1000]):
        f = quantize_frequencies(torch.tensor(counts), m_bits).tolist()
        assert sum(f) == 16 and all((fi >= 1) == (ci > 0) for fi, ci in zip(f, counts))

        def cost(fr, counts=counts):
            return sum(c * -math.log2(q / 16) for c, q in zip(counts, fr) if c)

        used = [i for i, c in enumerate(counts) if c]
        best = min(cost([dict(zip(used, comp)).get(i, 0) for i in range(len(counts))])
                   for comp in itertools.product(range(1, 17), repeat=len(used)) if sum(comp) == 16)
        assert cost(f) <= best + 1e-9


def test_quantize_frequencies_rejects_bad_counts():
    with pytest.raises(ValueError, match="all zero"):
        quantize_frequencies(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="do not fit"):
        quantize_frequencies(torch.ones(256, dtype=torch.int64), prob_bits=4)
    with pytest.raises(ValueError, match="prob_bits"):
        quantize_frequencies(torch.ones(3, dtype=torch.int64), prob_bits=17)


@pytest.mark.parametrize("case", ["empty", "one", "all_same", "uniform256", "skewed", "two_symbols", "runs"])
@pytest.mark.parametrize("lanes", [1, 7, None, 5000])
def test_round_trip_and_reference_bytes(case, lanes):
    g = torch.Generator().manual_seed(1)
    x = {
        "empty": torch.empty(0, dtype=torch.uint8),
        "one": torch.tensor([200], dtype=torch.uint8),
        "all_same": torch.full((3001,), 255, dtype=torch.uint8),
        "uniform256": torch.randint(0, 256, (4099,), generator=g).to(torch.uint8),
        "skewed": _skewed(5003),
        "two_symbols": (torch.rand(2000, generator=g) < 0.001).to(torch.uint8),
        "runs": torch.arange(4000).div(500, rounding_mode="floor").to(torch.uint8),
    }[case]
    enc = ans_encode(x, lanes=lanes)
    assert torch.equal(ans_decode(enc), x)
    f, cum = ans._tables(enc.freqs, enc.prob_bits)
    slot_sym = ans._slot_symbols(f)
    words, offsets, states = ans_ref.encode(x, enc.lanes, f, cum, enc.prob_bits)
    assert torch.equal(words, enc.words) and torch.equal(offsets, enc.lane_offsets)
    assert torch.equal(states, enc.final_states)
    assert torch.equal(ans_ref.decode(words, offsets, states, x.numel(), enc.lanes, slot_sym, f, cum, enc.prob_bits), x)
    back = ANSEncoded.from_bytes(enc.to_bytes())
    assert len(enc.to_bytes()) == enc.nbytes
    assert torch.equal(ans_decode(back), x)


@pytest.mark.parametrize("prob_bits", [1, 8, 12, 16])
def test_scalar_spec_decoder(prob_bits):
    x = _skewed(300, seed=prob_bits, spread=0.4 if prob_bits == 1 else 3.0)
    if prob_bits == 1:
        x = (x > 20).to(torch.uint8)
    enc = ans_encode(x, lanes=3, prob_bits=prob_bits)
    assert _scalar_decode(enc) == x.tolist()


def test_given_table_and_size_near_entropy():
    x = _skewed(1 << 20, spread=3.0)
    enc = ans_encode(x)
    h = _entropy(x)
    bits = enc.nbytes * 8 / x.numel()
    assert h <= bits <= h + 0.05, (h, bits)
    fixed = torch.zeros(256, dtype=torch.int32)
    fixed[:] = 16  # uniform 8-bit table: ~8 bits/symbol whatever the data
    enc2 = ans_encode(x, fixed, lanes=64)
    assert torch.equal(ans_decode(enc2), x)
    assert 7.99 <= enc2.nbytes * 8 / x.numel() <= 8.01


def test_cpp_path_is_used_and_matches_reference_on_large_input():
    assert ans_cpu.lib() is not None, "the C++ coder did not build"
    x = _skewed(200_003, seed=5)
    enc = ans_encode(x, lanes=997)
    f, cum = ans._tables(enc.freqs, enc.prob_bits)
    slot_sym = ans._slot_symbols(f)
    words, offsets, states = ans_ref.encode(x, 997, f, cum, enc.prob_bits)
    assert torch.equal(words, enc.words) and torch.equal(states, enc.final_states)
    assert torch.equal(ans_cpu.decode(words, offsets, states, x.numel(), 997, slot_sym, f, cum, enc.prob_bits), x)
    for threads in (2, 3, 7):  # lanes handed out to threads as they come: same bytes, same symbols
        w2, o2, s2 = ans_cpu.encode(x, 997, f, cum, enc.prob_bits, nthreads=threads)
        assert torch.equal(w2, words) and torch.equal(o2, offsets) and torch.equal(s2, states)
        out = ans_cpu.decode(words, offsets, states, x.numel(), 997, None, f, cum, enc.prob_bits, nthreads=threads)
        assert torch.equal(out, x)


def test_triton_interpreter_matches_cpu_bytes():
    script = (
        "import torch\n"
        "from memfit.kernels import ans\n"
        "from memfit.kernels.ans import gpu as ans_triton\n"
        "x = (torch.randn(3001, generator=torch.Generator().manual_seed(3)) * 3).round().clamp(-9, 9).add(9)"
        ".to(torch.uint8)\n"
        "for lanes in (1, 5, 130):\n"
        "    e = ans.ans_encode(x, lanes=lanes)\n"
        "    f, cum = ans._tables(e.freqs, e.prob_bits)\n"
        "    ss = ans._slot_symbols(f)\n"
        "    w, o, s = ans_triton.encode(x, lanes, f, cum, e.prob_bits, block=64, num_warps=1)\n"
        "    assert torch.equal(w, e.words) and torch.equal(o, e.lane_offsets) and torch.equal(s, e.final_states)\n"
        "    y = ans_triton.decode(e.words, e.lane_offsets, e.final_states, x.numel(), lanes, ss, f, cum, "
        "e.prob_bits, block=64, num_warps=1)\n"
        "    assert torch.equal(y, x)\n"
        "    bad = e.words.clone(); bad[len(bad) // 2] ^= 0x5A5A\n"
        "    try:\n"
        "        ans_triton.decode(bad, e.lane_offsets, e.final_states, x.numel(), lanes, ss, f, cum, e.prob_bits)\n"
        "        raise SystemExit('corrupt words accepted')\n"
        "    except ValueError as err:\n"
        "        assert 'does not decode' in str(err)\n"
        "y = x.clone(); y[:700] = 255  # a skewed stream, a length that is not a multiple of the program's share\n"
        "for n in (0, 1, 3001):\n"
        "    h = ans_triton.histogram(y[:n], block=256, iters=3)\n"
        "    assert torch.equal(h, torch.bincount(y[:n], minlength=256)), n\n"
        "print('OK')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_rejects_bad_input():
    x = _skewed(10_000)
    enc = ans_encode(x, lanes=16)
    buf = enc.to_bytes()
    with pytest.raises(ValueError, match="truncated"):
        ANSEncoded.from_bytes(buf[:20])
    with pytest.raises(ValueError, match="checksum"):
        ANSEncoded.from_bytes(buf[:-3])
    flipped = bytearray(buf)
    flipped[len(buf) // 2] ^= 0x10
    with pytest.raises(ValueError, match="checksum"):
        ANSEncoded.from_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="magic"):
        ANSEncoded.from_bytes(b"XXXX" + buf[4:])
    # a consistent header over altered words (checksum bypassed in memory) is caught by the decoder's end state
    bad = ANSEncoded(enc.words.clone(), enc.lane_offsets, enc.final_states, enc.freqs, enc.n, enc.lanes, enc.prob_bits)
    bad.words[5] ^= 0x0F0F
    with pytest.raises(ValueError, match="does not decode"):
        ans_decode(bad)
    with pytest.raises(ValueError, match="uint8"):
        ans_encode(x.to(torch.int32))
    table = torch.zeros(256, dtype=torch.int32)
    table[0] = 4096
    with pytest.raises(ValueError, match="frequency 0"):
        ans_encode(x, table)
    with pytest.raises(ValueError, match="sum to"):
        ans_encode(x, torch.ones(8, dtype=torch.int32))


@pytest.mark.gpu
def test_gpu_round_trip_and_cross_device_bytes():
    x = _skewed(10_000_019, seed=9).cuda()
    enc = ans_encode(x)
    cpu = ans_encode(x.cpu(), lanes=enc.lanes)
    assert torch.equal(enc.words.cpu(), cpu.words) and torch.equal(enc.final_states.cpu(), cpu.final_states)
    assert torch.equal(ans_decode(enc), x)
    assert torch.equal(ans_decode(cpu, "cuda"), x)
    assert torch.equal(ans_decode(enc, "cpu"), x.cpu())


def test_cpu_decode_leaves_its_inputs_resizable():
    """FSDP2 frees its all-gather buffers by resizing their storage to 0; the NeuZip all-gather hands slices of those
    buffers to the CPU decoder, which must not pin them (a numpy view of a tensor makes its storage non-resizable)."""
    from memfit.kernels.ans import ANSEncoded, ans_decode, ans_encode

    sym = torch.randint(0, 7, (5000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64).to(torch.uint8)
    enc = ans_encode(sym, lanes=4)
    buf_words, buf_freqs = enc.words.clone(), enc.freqs.to(torch.int32).clone()
    view = ANSEncoded(buf_words[: enc.words.numel()], enc.lane_offsets, enc.final_states, buf_freqs[:], enc.n,
                      enc.lanes, enc.prob_bits)
    assert torch.equal(ans_decode(view), sym)
    for t in (buf_words, buf_freqs):
        t.untyped_storage().resize_(0)  # raises "Trying to resize storage that is not resizable" if pinned
