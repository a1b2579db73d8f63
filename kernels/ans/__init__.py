"""Interleaved rANS entropy coder with a static frequency table (NeuZip exponents, FM-Delta symbols).

State machine: 32-bit state x in [L, 2**32) with L = 2**16, 16-bit renormalisation words, probabilities quantised to
`prob_bits` (1..16) bits. Encoding symbol s (frequency f, cumulative c): if x >= (2**(32 - prob_bits)) * f, emit the low
16 bits and shift right by 16; then x = (x // f) << prob_bits | (x % f) + c. Decoding inverts it and reads at most one
word per symbol. Every lane starts encoding at x = L, so a decoder that does not end exactly at L having consumed
exactly its words has been given a corrupt stream.

Layout: symbol i belongs to lane i % lanes at step i // lanes (a GPU warp then writes 32 consecutive bytes per step);
each lane's words are stored in decode order and all lanes are concatenated (lane_offsets). The CPU path
(kernels/csrc/ans.cpp via ctypes, threads over lanes, 32 interleaved lanes per thread), the Triton path (one lane per
GPU thread) and the torch reference (kernels/ans/reference.py) produce and accept identical bytes.

API:
    quantize_frequencies(counts, prob_bits=12) -> int32 (alphabet,), sums to 2**prob_bits, >= 1 where counts > 0
    ans_encode(symbols uint8 1-D CPU|CUDA, freqs=None, *, lanes=None, prob_bits=12) -> ANSEncoded (on symbols' device)
    ans_decode(enc, device=None) -> uint8 (n,) on `device` (default: where enc's tensors live)
    enc.decode_table() -> the Triton decoder's slot table on enc's device, built once and cached in `enc.table`
    (ans_encode on CUDA builds it at compression time; kernels/ans_triton.launch_decode also fuses NeuZip's
    sign/mantissa merge into the same launch)
    ANSEncoded.to_bytes() / ANSEncoded.from_bytes(buf) (ValueError naming the problem); .nbytes == len(to_bytes())
Refinements of the brief: `words` is int16 holding uint16 bit patterns (torch's uint16 lacks most ops);
`final_states` is int64 holding uint32 values; `default_lanes(n)` picks ~2048 symbols per lane (per-lane cost is
6-8 bytes, i.e. ~0.03 bits/symbol); one lane may hold at most 2**32 - 1 symbols.

Serialised form (little-endian): 28-byte header [magic b"rANS", version u8, prob_bits u8, flags u16 (bit 0: word
counts stored as u16), n u64, lanes u32, alphabet u16, reserved u16, crc32 of the body u32], then the body: bitmap of
used symbols (ceil(alphabet/8) bytes), (freq - 1) u16 for each used symbol, per-lane word counts (u16 or u32), per-lane
final states u32, words u16.
"""

from __future__ import annotations

import heapq
import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from memfit.kernels.ans import reference as ans_ref

ANS_L = ans_ref.ANS_L
MAGIC = b"rANS"
VERSION = 1
_HEADER = struct.Struct("<4sBBHQIHHI")
SYMBOLS_PER_LANE = 2048


def quantize_frequencies(counts: torch.Tensor, prob_bits: int = 12) -> torch.Tensor:
    """Integer frequencies summing to 2**prob_bits, >= 1 for every seen symbol, close to counts in code length.

    Starts from the floored proportional share and moves single units greedily by the smallest increase of
    sum(count * -log2(freq)), so the table is near-optimal for the data it came from.
    """
    if not 1 <= prob_bits <= 16:
        raise ValueError(f"prob_bits must be in 1..16, got {prob_bits}")
    c = torch.as_tensor(counts).to(torch.int64).cpu()
    if c.dim() != 1 or not 1 <= c.numel() <= 256:
        raise ValueError(f"counts must be 1-D with 1..256 entries, got shape {tuple(c.shape)}")
    if bool((c < 0).any()):
        raise ValueError("counts must be non-negative")
    total = int(c.sum())
    if total == 0:
        raise ValueError("counts are all zero: nothing to model")
    m = 1 << prob_bits
    used = int((c > 0).sum())
    if used > m:
        raise ValueError(f"{used} distinct symbols do not fit in 2**{prob_bits} probability slots")
    cl = c.tolist()
    f = [max(1, ci * m // total) if ci > 0 else 0 for ci in cl]
    diff = m - sum(f)
    if diff > 0:  # add units where the gain c*log2((f+1)/f) is largest
        heap = [(-ci * math.log2((fi + 1) / fi), i) for i, (ci, fi) in enumerate(zip(cl, f)) if ci > 0]
        heapq.heapify(heap)
        for _ in range(diff):
            _, i = heapq.heappop(heap)
            f[i] += 1
            heapq.heappush(heap, (-cl[i] * math.log2((f[i] + 1) / f[i]), i))
    elif diff < 0:  # remove units where the loss c*log2(f/(f-1)) is smallest
        heap = [(ci * math.log2(fi / (fi - 1)), i) for i, (ci, fi) in enumerate(zip(cl, f)) if fi > 1]
        heapq.heapify(heap)
        for _ in range(-diff):
            _, i = heapq.heappop(heap)
            f[i] -= 1
            if f[i] > 1:
                heapq.heappush(heap, (cl[i] * math.log2(f[i] / (f[i] - 1)), i))
    return torch.tensor(f, dtype=torch.int32)


def default_lanes(n: int, symbols_per_lane: int = SYMBOLS_PER_LANE) -> int:
    """Enough lanes for GPU parallelism, few enough that per-lane headers stay ~0.03 bits/symbol."""
    return max(1, -(-n // symbols_per_lane))


@dataclass
class ANSEncoded:
    """One encoded stream: all tensors on one device; see the module docstring for the meaning of each field."""

    words: torch.Tensor  # int16 (uint16 bits), all lanes concatenated in decode order
    lane_offsets: torch.Tensor  # int64 (lanes + 1,)
    final_states: torch.Tensor  # int64 (lanes,), uint32 values in [L, 2**32)
    freqs: torch.Tensor  # int32 (alphabet,), sums to 2**prob_bits
    n: int
    lanes: int
    prob_bits: int
    # decode table (ans_triton.slot_table) cached on the words' device: built once, never per decode
    table: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def decode_table(self) -> torch.Tensor:
        """The device-resident slot table for the Triton decoder (built on first use, no host sync)."""
        if self.table is None or self.table.device != self.words.device:
            from memfit.kernels.ans.gpu import slot_table

            self.table = slot_table(self.freqs, self.prob_bits, self.words.device)
        return self.table

    def _word_counts(self) -> torch.Tensor:
        return (self.lane_offsets[1:] - self.lane_offsets[:-1]).cpu()

    def _small_counts(self) -> bool:
        return -(-self.n // self.lanes) < (1 << 16)

    @property
    def nbytes(self) -> int:
        """Size of to_bytes(): header, frequency table, per-lane counts and states, words."""
        a = self.freqs.numel()
        used = int((self.freqs > 0).sum())
        per_lane = (2 if self._small_counts() else 4) + 4
        return _HEADER.size + -(-a // 8) + 2 * used + per_lane * self.lanes + 2 * self.words.numel()

    def to(self, device: torch.device | str) -> ANSEncoded:
        tab = None if self.table is None else self.table.to(device)
        return ANSEncoded(self.words.to(device), self.lane_offsets.to(device), self.final_states.to(device),
                          self.freqs.to(device), self.n, self.lanes, self.prob_bits, tab)

    def to_bytes(self) -> bytes:
        f = self.freqs.cpu().to(torch.int64).numpy()
        used = f > 0
        bitmap = np.packbits(used, bitorder="little").tobytes()
        small = self._small_counts()
        counts = self._word_counts().numpy().astype("<u2" if small else "<u4")
        words = self.words.cpu().numpy()
        body = b"".join([  # memoryviews: the join is the only copy of the (large) word stream
            bitmap,
            (f[used] - 1).astype("<u2").tobytes(),
            counts.tobytes(),
            self.final_states.cpu().numpy().astype("<u4").tobytes(),
            memoryview(np.ascontiguousarray(words, dtype="<i2")).cast("B"),
        ])
        head = _HEADER.pack(MAGIC, VERSION, self.prob_bits, int(small), self.n, self.lanes, f.size, 0,
                            zlib.crc32(body))
        return head + body

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview) -> ANSEncoded:
        """Parse and validate a serialised stream (ValueError naming what is wrong)."""
        buf = memoryview(buf).cast("B")
        if len(buf) < _HEADER.size:
            raise ValueError(f"rANS buffer truncated: {len(buf)} bytes, header needs {_HEADER.size}")
        magic, version, prob_bits, flags, n, lanes, alphabet, _, crc = _HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise ValueError(f"not an rANS stream: bad magic {bytes(magic)!r}")
        if version != VERSION:
            raise ValueError(f"unsupported rANS stream version {version} (expected {VERSION})")
        if not 1 <= prob_bits <= 16 or not 1 <= alphabet <= 256 or lanes < 1 or flags > 1:
            raise ValueError(f"corrupt rANS header: prob_bits={prob_bits} alphabet={alphabet} lanes={lanes}")
        body = buf[_HEADER.size:]
        if zlib.crc32(body) != crc:
            raise ValueError("corrupt rANS stream: checksum mismatch (truncated or altered body)")
        pos = 0

        def take(nbytes: int, what: str) -> memoryview:
            nonlocal pos
            if pos + nbytes > len(body):
                raise ValueError(f"rANS buffer truncated in the {what}: need {nbytes} bytes at {pos}, have {len(body)}")
            pos += nbytes
            return body[pos - nbytes: pos]

        used = np.unpackbits(np.frombuffer(take(-(-alphabet // 8), "frequency bitmap"), np.uint8),
                             bitorder="little")[:alphabet].astype(bool)
        freqs = np.zeros(alphabet, np.int64)
        freqs[used] = np.frombuffer(take(2 * int(used.sum()), "frequency table"), "<u2").astype(np.int64) + 1
        if int(freqs.sum()) != 1 << prob_bits:
            raise ValueError(f"corrupt rANS frequency table: sums to {int(freqs.sum())}, not 2**{prob_bits}")
        cdt = "<u2" if flags & 1 else "<u4"
        counts = np.frombuffer(take(lanes * np.dtype(cdt).itemsize, "lane word counts"), cdt).astype(np.int64)
        states = np.frombuffer(take(4 * lanes, "lane states"), "<u4").astype(np.int64)
        if (states < ANS_L).any():
            raise ValueError("corrupt rANS stream: a lane state is below the normalisation bound")
        total = int(counts.sum())
        words = np.frombuffer(take(2 * total, "words"), "<i2")
        if pos != len(body):
            raise ValueError(f"rANS buffer has {len(body) - pos} trailing bytes")
        offsets = np.zeros(lanes + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(torch.from_numpy(words.copy()), torch.from_numpy(offsets), torch.from_numpy(states.copy()),
                   torch.from_numpy(freqs).to(torch.int32), n, lanes, prob_bits)


def _tables(freqs: torch.Tensor, prob_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(freq (256,), cum (256,)) int64 on the CPU, computed in numpy: a torch op here may wake torch's thread pool,
    which costs milliseconds per call on a busy machine (it made 2 threads 2-4x slower than 1 on small tensors)."""
    f = np.zeros(256, np.int64)
    f[: freqs.numel()] = freqs.cpu().to(torch.int64, copy=True).numpy()  # a copy: a numpy view of FSDP2's
    # all-gather buffer would make its storage non-resizable
    return torch.from_numpy(f), torch.from_numpy(np.cumsum(f) - f)


def _slot_symbols(f: torch.Tensor) -> torch.Tensor:
    """slot -> symbol (2**prob_bits,) uint8: only the torch reference decoder needs it (the C++ one builds its own)."""
    return torch.from_numpy(np.repeat(np.arange(256, dtype=np.uint8), f.numpy()))


def _check_freqs(freqs: torch.Tensor, prob_bits: int) -> torch.Tensor:
    f = torch.as_tensor(freqs).cpu()
    if f.dim() != 1 or not 1 <= f.numel() <= 256 or f.dtype.is_floating_point:
        raise ValueError(f"freqs must be a 1-D integer tensor of 1..256 entries, got {f.dtype} {tuple(f.shape)}")
    if bool((f < 0).any()) or int(f.sum()) != 1 << prob_bits:
        raise ValueError(f"freqs must be non-negative and sum to 2**{prob_bits}={1 << prob_bits}, got {int(f.sum())}")
    return f.to(torch.int32)


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda"


def ans_encode(symbols: torch.Tensor, freqs: torch.Tensor | None = None, *, lanes: int | None = None,
               prob_bits: int = 12) -> ANSEncoded:
    """Entropy-code a 1-D uint8 tensor; the table is quantize_frequencies(histogram) unless `freqs` is given."""
    if not isinstance(symbols, torch.Tensor) or symbols.dtype != torch.uint8 or symbols.dim() != 1:
        raise ValueError(f"symbols must be a 1-D torch.uint8 tensor, got {getattr(symbols, 'dtype', type(symbols))}"
                         f" of shape {tuple(getattr(symbols, 'shape', ()))}")
    if not 1 <= prob_bits <= 16:
        raise ValueError(f"prob_bits must be in 1..16, got {prob_bits}")
    n = symbols.numel()
    lanes = default_lanes(n) if lanes is None else int(lanes)
    if lanes < 1 or -(-n // lanes) >= 1 << 32 or lanes >= 1 << 32:
        raise ValueError(f"lanes={lanes} invalid for {n} symbols (1 <= lanes < 2**32, < 2**32 symbols per lane)")
    symbols = symbols.contiguous()
    cuda = _use_triton(symbols.device)
    if freqs is None:
        if n == 0:
            freqs = torch.tensor([1 << prob_bits], dtype=torch.int32)
        else:
            counts = _histogram(symbols)
            last = int(torch.nonzero(counts)[-1]) + 1
            freqs = quantize_frequencies(counts[:last], prob_bits)
    freqs = _check_freqs(freqs, prob_bits)
    f, cum = _tables(freqs, prob_bits)
    if cuda:
        from memfit.kernels.ans import gpu as ans_triton

        words, offsets, states = ans_triton.encode(symbols, lanes, f, cum, prob_bits)
        enc = ANSEncoded(words, offsets, states, freqs.to(symbols.device), n, lanes, prob_bits)
        enc.decode_table()  # built once here, at compression time
        return enc
    backend = _cpu_backend()
    words, offsets, states = backend.encode(symbols, lanes, f, cum, prob_bits)
    return ANSEncoded(words, offsets, states, freqs, n, lanes, prob_bits)


def ans_decode(enc: ANSEncoded, device: torch.device | str | None = None, *, validate: bool = True) -> torch.Tensor:
    """Decode to uint8 (n,) on `device` (default: enc.words.device); ValueError on an inconsistent stream.

    `validate=False` skips, on CUDA, the end-state check and the header consistency checks (each needs a host sync),
    and the decode table comes from enc's cache: one kernel launch, no sync. The CPU path always checks.
    """
    device = torch.device(device) if device is not None else enc.words.device
    if enc.lane_offsets.numel() != enc.lanes + 1 or enc.final_states.numel() != enc.lanes:
        raise ValueError(f"ANSEncoded has {enc.lane_offsets.numel()} offsets / {enc.final_states.numel()} states for "
                         f"{enc.lanes} lanes")
    if enc.words.dtype != torch.int16:
        raise ValueError(f"ANSEncoded words must be int16, got {enc.words.dtype}")
    if _use_triton(device):
        from memfit.kernels.ans import gpu as ans_triton

        e = enc if enc.words.device == device else enc.to(device)
        if validate:
            _check_consistent(e)
        return ans_triton.decode(e.words, e.lane_offsets, e.final_states, enc.n, enc.lanes, None, e.freqs, None,
                                 enc.prob_bits, validate=validate, table=e.decode_table())
    _check_consistent(enc)
    freqs = _check_freqs(enc.freqs, enc.prob_bits)
    f, cum = _tables(freqs, enc.prob_bits)
    e = enc.to("cpu")
    backend = _cpu_backend()
    slot_sym = _slot_symbols(f) if backend is ans_ref else None
    return backend.decode(e.words.contiguous(), e.lane_offsets.contiguous(), e.final_states, enc.n, enc.lanes,
                          slot_sym, f, cum, enc.prob_bits).to(device)


def _check_consistent(enc: ANSEncoded) -> None:
    if int(enc.lane_offsets[-1]) != enc.words.numel():
        raise ValueError("ANSEncoded words do not match lane_offsets")
    _check_freqs(enc.freqs, enc.prob_bits)


def _cpu_backend():
    """The compiled C++ coder, or the torch reference when it cannot be built."""
    from memfit.kernels.ans import native as ans_cpu

    return ans_cpu if ans_cpu.lib() is not None else ans_ref


def _histogram(symbols: torch.Tensor) -> torch.Tensor:
    """int64 (256,) counts on the CPU: Triton on CUDA (torch.bincount serialises on one hot bin), else C++."""
    if symbols.is_cuda:
        from memfit.kernels.ans import gpu as ans_triton

        return ans_triton.histogram(symbols).cpu()
    from memfit.kernels.ans import native as ans_cpu

    return ans_cpu.histogram(symbols) if ans_cpu.lib() is not None else torch.bincount(symbols, minlength=256)
