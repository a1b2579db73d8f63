"""NeuZipTensor: a frozen weight kept entropy-coded (exponents through memfit.kernels.ans, sign+mantissa packed raw).

Behaves as a tensor of the original shape and dtype: `F.linear` decodes the weight just in time in forward and again
in backward (only the compressed form is saved for autograd; on CUDA the next layer's weight is decoded on a side
stream while this one computes, see neuzip_prefetch); any other op decodes and runs densely. On CUDA `dequantize` is
one fused Triton launch (rANS lanes + sign/mantissa merge, decode table cached on the device, no host sync).
The compressed form lives in a shared `_Store`, so views (view/detach/as_strided, as FSDP2 makes) see a `copy_` into
any of them. `torch.save`/state_dict carry the compressed bytes; `copy_` from another NeuZipTensor (load_state_dict)
adopts its compressed form. FSDP2 (neuzip_ops): a dim-0 split re-compresses each rank's rows (all ranks compute the
same bytes, so every shard knows the largest word count, `fsdp_pad_to`); the all-gather moves the compressed tensors
padded to that size, and `fsdp_post_all_gather` decodes every rank's part on the device into the dense weight.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from memfit.kernels.ans import ANSEncoded, ans_decode, ans_encode
from memfit.quant import neuzip_codec as codec
from memfit.quant.subclass import StorageTensor, contiguous_strides

_MAGIC = b"NZIP"
_VERSION = 2  # v2: the crc32 also covers the header (v1's left dtype and block size unchecked); v1 still reads
_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# magic, version, dtype code, mantissa bits, ndim, block (0 = none), ans bytes, packed bytes, scales count, crc32 of
# the header (its crc field zeroed) and everything after it (the rANS part has its own checksum too)
_HEAD = struct.Struct("<4sBBBBIQQQI")
SYMBOLS_PER_LANE = 256  # ~2.6e5 lanes per 128 MB: enough for a GPU to hide the per-step latency (+0.14 bit/weight vs 2048)


@dataclass(eq=False)
class _Store:
    """The compressed form, shared by a NeuZipTensor and its views; `version` changes whenever it is replaced."""

    enc: ANSEncoded
    packed: torch.Tensor
    scales: torch.Tensor | None
    mantissa_bits: int
    block: int | None
    fsdp_pad_to: int | None = None  # words every rank's all-gather input is padded to (set by a dim-0 split)
    spl: int = SYMBOLS_PER_LANE  # symbols per rANS lane used when (re)compressing
    version: int = 0
    trainer: Any = None  # InBackwardOptimizer when the weight is trained compressed (neuzip_train), else frozen
    name: str | None = None  # parameter name, for the trainer's state

    def moved(self, device: torch.device | str) -> _Store:
        sc = None if self.scales is None else self.scales.to(device)
        enc = self.enc if self.packed.device == torch.device(device) else self.enc.to(device)
        return _Store(enc, self.packed.to(device), sc, self.mantissa_bits, self.block, self.fsdp_pad_to, self.spl,
                      trainer=self.trainer, name=self.name)


def _store_prop(name: str) -> property:
    return property(lambda self: getattr(self._s, name), lambda self, v: setattr(self._s, name, v))


class NeuZipTensor(StorageTensor):
    """Compressed frozen weight; see the module docstring."""

    _s: _Store
    enc = _store_prop("enc")
    packed = _store_prop("packed")
    scales = _store_prop("scales")
    mantissa_bits = _store_prop("mantissa_bits")
    block = _store_prop("block")
    fsdp_pad_to = _store_prop("fsdp_pad_to")

    @staticmethod
    def __new__(cls, enc, packed, scales, shape, dtype, mantissa_bits, block, store=None):
        shape = torch.Size(shape)
        return torch.Tensor._make_wrapper_subclass(cls, shape, strides=contiguous_strides(shape), dtype=dtype,
                                                   device=packed.device, requires_grad=False)

    def __init__(self, enc: ANSEncoded, packed: torch.Tensor, scales: torch.Tensor | None, shape: torch.Size,
                 dtype: torch.dtype, mantissa_bits: int, block: int | None, store: _Store | None = None):
        self._s = store if store is not None else _Store(enc, packed, scales, mantissa_bits, block)

    @classmethod
    def _wrap(cls, store: _Store, shape: torch.Size, dtype: torch.dtype) -> NeuZipTensor:
        """A tensor of `shape` over `store` (shared, not copied)."""
        return cls(store.enc, store.packed, store.scales, shape, dtype, store.mantissa_bits, store.block, store)

    # ---- construction / decoding -------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, w: torch.Tensor, mantissa_bits: int | None = None, *, block: int | None = None,
                   symbols_per_lane: int = SYMBOLS_PER_LANE) -> NeuZipTensor:
        """Compress `w` (bf16/fp16/fp32); mantissa_bits None = lossless, else keep k bits (rounded, carried)."""
        if isinstance(w, NeuZipTensor):
            w = w.dequantize()
        k = codec.check_mantissa_bits(w.dtype, mantissa_bits)
        exps, signman, scales = codec.split(w, k, block)
        lanes = max(1, -(-exps.numel() // symbols_per_lane))
        enc = ans_encode(exps, lanes=lanes)  # on CUDA this also builds the device decode table, once
        packed = codec.pack_bits(signman, 1 + k)
        z = cls(enc, packed, scales, w.shape, w.dtype, k, block)
        z._s.spl = symbols_per_lane
        return z

    def dequantize(self, *, use_triton: bool | None = None) -> torch.Tensor:
        """Decode into a fresh dense tensor on this tensor's device (CUDA: one fused launch, no host sync).

        `use_triton=True` forces the Triton kernel on CPU tensors (only meaningful under TRITON_INTERPRET=1, for tests).
        """
        flat = decode_store(self._s, self.dtype, self.numel(), use_triton=use_triton)
        return flat.view(self.shape)

    @property
    def compressed_nbytes(self) -> int:
        """Bytes of to_bytes(): header, shape, rANS stream (with its tables), packed bits and block scales."""
        sc = 0 if self.scales is None else 4 * self.scales.numel()
        return _HEAD.size + 8 * self.dim() + self.enc.nbytes + self.packed.numel() + sc

    def to_bytes(self) -> bytes:
        a = self.enc.to_bytes()
        sc = b"" if self.scales is None else self.scales.float().cpu().numpy().astype("<f4").tobytes()
        body = b"".join([struct.pack(f"<{self.dim()}q", *self.shape), a, self.packed.cpu().numpy().tobytes(), sc])
        fields = (_MAGIC, _VERSION, _DTYPES.index(self.dtype), self.mantissa_bits, self.dim(), self.block or 0, len(a),
                  self.packed.numel(), 0 if self.scales is None else self.scales.numel())
        return _HEAD.pack(*fields, zlib.crc32(body, zlib.crc32(_HEAD.pack(*fields, 0)))) + body

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview, device: torch.device | str = "cpu") -> NeuZipTensor:
        """Parse a serialised NeuZipTensor; ValueError naming the problem on truncated or corrupt input."""
        buf = memoryview(buf).cast("B")
        if len(buf) < _HEAD.size:
            raise ValueError(f"NeuZip buffer truncated: {len(buf)} bytes, header needs {_HEAD.size}")
        magic, ver, dcode, k, ndim, block, na, npk, nsc, crc = _HEAD.unpack_from(buf)
        if magic != _MAGIC or ver not in (1, _VERSION):
            raise ValueError(f"not a NeuZip v1/v{_VERSION} buffer (magic {bytes(magic)!r}, version {ver})")
        if dcode >= len(_DTYPES):
            raise ValueError(f"corrupt NeuZip header: dtype code {dcode}")
        dtype = _DTYPES[dcode]
        codec.check_mantissa_bits(dtype, k)
        need = _HEAD.size + 8 * ndim + na + npk + 4 * nsc
        if len(buf) != need:
            raise ValueError(f"NeuZip buffer is {len(buf)} bytes, its header describes {need} (truncated or padded)")
        head_crc = 0 if ver == 1 else zlib.crc32(_HEAD.pack(magic, ver, dcode, k, ndim, block, na, npk, nsc, 0))
        if zlib.crc32(buf[_HEAD.size:], head_crc) != crc:
            raise ValueError("corrupt NeuZip buffer: checksum mismatch")
        pos = _HEAD.size + 8 * ndim
        shape = torch.Size(struct.unpack_from(f"<{ndim}q", buf, _HEAD.size))
        n = shape.numel()
        enc = ANSEncoded.from_bytes(buf[pos: pos + na])
        if enc.n != n:
            raise ValueError(f"NeuZip exponent stream holds {enc.n} symbols for a tensor of {n} elements")
        # numpy, not torch.frombuffer: an empty tensor has empty sections, which torch.frombuffer refuses
        packed = torch.from_numpy(np.frombuffer(buf[pos + na: pos + na + npk], np.uint8).copy())
        if packed.numel() != codec.packed_nbytes(n, 1 + k):
            raise ValueError(f"NeuZip sign/mantissa section has {packed.numel()} bytes, expected "
                             f"{codec.packed_nbytes(n, 1 + k)}")
        scales = None
        if block:
            expect = -(-n // block)
            if nsc != expect:
                raise ValueError(f"NeuZip has {nsc} block scales, expected {expect}")
            scales = torch.from_numpy(np.frombuffer(buf[pos + na + npk:], "<f4").astype(np.float32))
        z = cls(enc, packed, scales, shape, dtype, k, block or None)
        return z if torch.device(device).type == "cpu" else z._to(device)

    def __reduce_ex__(self, proto):
        # a uint8 tensor, not bytes: torch.save stores tensors as raw storages (protocol-2 bytes would be re-encoded)
        return (_rebuild, (torch.frombuffer(bytearray(self.to_bytes()), dtype=torch.uint8), str(self.device)))

    def __repr__(self, *, tensor_contents=None) -> str:
        return (f"NeuZipTensor(shape={tuple(self.shape)}, dtype={self.dtype}, mantissa_bits={self.mantissa_bits}, "
                f"bits/weight={8 * self.compressed_nbytes / max(1, self.numel()):.3f})")

    def _to(self, device: torch.device | str) -> NeuZipTensor:
        return NeuZipTensor._wrap(self._s.moved(device), self.shape, self.dtype)

    # ---- traceable-subclass protocol: nn.Module._apply (`model.to(device)`, as Lightning moves a model) and FSDP2's
    # device move swap a traceable subclass with `torch.utils.swap_tensors`; any other subclass gets
    # `param.data = moved`, which changes the tensor's device metadata but keeps this object's store where it was
    # (the CUDA run then decoded a CPU weight: "mat2 is on cpu").
    _enc_words = property(lambda self: self._s.enc.words)
    _enc_lane_offsets = property(lambda self: self._s.enc.lane_offsets)
    _enc_final_states = property(lambda self: self._s.enc.final_states)
    _enc_freqs = property(lambda self: self._s.enc.freqs)

    def __tensor_flatten__(self) -> tuple[list[str], tuple[Any, ...]]:
        s, e = self._s, self._s.enc
        names = ["_enc_words", "_enc_lane_offsets", "_enc_final_states", "_enc_freqs", "packed"]
        if s.scales is not None:
            names.append("scales")
        return names, (self.dtype, e.n, e.lanes, e.prob_bits, s.mantissa_bits, s.block, s.fsdp_pad_to, s.spl,
                       s.trainer, s.name)

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], ctx: tuple[Any, ...], outer_size: torch.Size,
                             outer_stride: Any) -> NeuZipTensor:
        dtype, n, lanes, prob_bits, k, block, pad, spl, trainer, name = ctx
        enc = ANSEncoded(inner["_enc_words"], inner["_enc_lane_offsets"], inner["_enc_final_states"],
                         inner["_enc_freqs"], n, lanes, prob_bits)
        store = _Store(enc, inner["packed"], inner.get("scales"), k, block, pad, spl, trainer=trainer, name=name)
        return NeuZipTensor._wrap(store, torch.Size(outer_size), dtype)

    # ---- FSDP2 all-gather extension ------------------------------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh: Any, outer_size: Any = None, outer_stride: Any = None, module: Any = None,
                            mp_policy: Any = None) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...]]:
        """All-gather this shard's compressed tensors (never a dense copy); words are zero-padded to `fsdp_pad_to`,
        the frequency table to 256 entries, so every rank sends equal sizes."""
        s, e = self._s, self._s.enc
        if outer_size is not None and mesh is not None and e.n * mesh.size() != torch.Size(outer_size).numel():
            raise NotImplementedError(f"NeuZipTensor under FSDP2 needs dim 0 ({tuple(outer_size)}) divisible by the "
                                      f"world size {mesh.size()}: uneven shards would be padded by re-encoding")
        pad = s.fsdp_pad_to if s.fsdp_pad_to is not None else e.words.numel()
        if e.words.numel() > pad:
            raise ValueError(f"NeuZip shard has {e.words.numel()} words, more than fsdp_pad_to={pad}")
        words = torch.cat([e.words, e.words.new_zeros(pad - e.words.numel())])
        freqs = torch.cat([e.freqs.to(torch.int32), e.freqs.new_zeros(256 - e.freqs.numel(), dtype=torch.int32)])
        dev = s.packed.device
        inputs = [words, e.lane_offsets, e.final_states, freqs.to(dev), s.packed]
        if s.scales is not None:
            inputs.append(s.scales)
        meta = (e.n, e.lanes, e.prob_bits, s.mantissa_bits, s.block, pad)
        return tuple(t.to(dev) for t in inputs), meta

    def fsdp_post_all_gather(self, all_gather_outputs: tuple[torch.Tensor, ...], metadata: tuple[Any, ...],
                             param_dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None) -> Any:
        """Decode every rank's compressed part (rows split along dim 0) straight into the dense weight.

        On a 1-rank mesh FSDP2 (seen with torch 2.13) skips the collective and copies only the FIRST all-gather input;
        this shard is then the whole tensor, so its own compressed form is decoded (`_gather`)."""
        if out is not None:  # refill the unsharded weight in place, invisible to autograd (as FSDP2's own copy-out)
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(out):
                dense = self._gather(all_gather_outputs, metadata, out)
                if dense is not out:
                    out.copy_(dense.view(out.shape))
            return None
        dense = self._gather(all_gather_outputs, metadata)
        if param_dtype is not None and param_dtype != self.dtype:
            dense = dense.to(param_dtype)
        return dense, (dense,)  # FSDP frees this storage after use (reshard) and refills it through `out`

    def _gather(self, outputs: tuple[torch.Tensor, ...], metadata: tuple[Any, ...],
                out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight from the all-gather outputs, or from this shard alone on FSDP2's 1-rank shortcut."""
        if len(outputs) > 1 or self.numel() != metadata[0]:
            return gather_dense(outputs, metadata, self.dtype, out)
        if out is None or not out.is_contiguous() or out.dtype != self.dtype:
            out = torch.empty(self.numel(), dtype=self.dtype, device=self.device)
        decode_store(self._s, self.dtype, self.numel(), out=out.detach().view(-1))
        return out

    # ---- torch integration ---------------------------------------------------------------------------------------
    # F.linear on this weight: set by memfit.quant.neuzip_prefetch (just-in-time decode in forward and backward)
    linear_impl: Callable[..., torch.Tensor] | None = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], NeuZipTensor) and cls.linear_impl is not None:
            return cls.linear_impl(args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias"))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _rebuild(buf: torch.Tensor, device: str) -> NeuZipTensor:
    return NeuZipTensor.from_bytes(buf.numpy().tobytes(), device)


# Lightning loads checkpoints with weights_only=True: allow the rebuild of the compressed form (it only parses and
# checksums bytes; from_bytes rejects anything malformed)
torch.serialization.add_safe_globals([_rebuild])


def decode_store(s: _Store, dtype: torch.dtype, n: int, *, out: torch.Tensor | None = None,
                 use_triton: bool | None = None) -> torch.Tensor:
    """Flat dense (n,) of `dtype` from a compressed store, written into `out` (contiguous, n elements) if given.

    CUDA (or use_triton=True): one fused decode+merge launch using the cached device table, no host sync, no copies;
    block scales (lossy block normalisation only) are applied after it. CPU: C++ rANS decode, then torch merge."""
    fmt = codec.float_format(dtype)
    dev = s.packed.device
    if dev.type == "meta":  # a `.to("meta")` copy has shapes but no data: the result is a meta tensor as well
        return out.view(-1) if out is not None else torch.empty(n, dtype=dtype, device=dev)
    if use_triton if use_triton is not None else dev.type == "cuda":
        from memfit.kernels.ans.gpu import launch_decode

        e = s.enc
        bits = out.view(-1).view(fmt.int_dtype) if out is not None else torch.empty(n, dtype=fmt.int_dtype, device=dev)
        launch_decode(e.words, e.lane_offsets, e.final_states, e.decode_table(), n, e.lanes, e.prob_bits, bits,
                      packed=s.packed, mantissa_bits=s.mantissa_bits, man_bits=fmt.man_bits, total_bits=fmt.bits)
        res = bits.view(dtype)
    else:
        exps = ans_decode(s.enc, dev, validate=False)
        signman = codec.unpack_bits(s.packed, 1 + s.mantissa_bits, n)
        res = codec.combine(exps, signman, s.mantissa_bits, dtype)
        if out is not None:
            out.view(-1).copy_(res)
            res = out.view(-1)
    if s.scales is not None:
        scaled = codec.combine_scales(res, s.scales, s.block)
        if out is None:
            return scaled
        res.copy_(scaled)
    return res


def gather_dense(outputs: tuple[torch.Tensor, ...], meta: tuple[Any, ...], dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode the all-gathered compressed parts (see fsdp_pre_all_gather) of every rank into one flat-ordered dense
    tensor (into `out` when it is given, contiguous and of `dtype`)."""
    n, lanes, prob_bits, k, block, pad = meta
    words, offs, states, freqs, packed, *scales = (t.reshape(-1) for t in outputs)
    world = offs.numel() // (lanes + 1)
    if offs.numel() != world * (lanes + 1) or words.numel() != world * pad or freqs.numel() != world * 256:
        raise ValueError(f"all-gathered NeuZip parts do not match their metadata (n={n}, lanes={lanes}, pad={pad})")
    if out is None or not out.is_contiguous() or out.dtype != dtype:
        out = torch.empty(world * n, dtype=dtype, device=packed.device)
    flat = out.detach().view(-1)
    npk = packed.numel() // world
    nsc = scales[0].numel() // world if scales else 0
    for r in range(world):
        w, o = words[r * pad: (r + 1) * pad], offs[r * (lanes + 1): (r + 1) * (lanes + 1)]
        if w.device.type != "cuda":
            w = w[: int(o[-1])]  # the CPU decoder checks every word is consumed
        enc = ANSEncoded(w, o, states[r * lanes: (r + 1) * lanes], freqs[r * 256: (r + 1) * 256], n, lanes, prob_bits)
        sc = scales[0][r * nsc: (r + 1) * nsc] if scales else None
        decode_store(_Store(enc, packed[r * npk: (r + 1) * npk], sc, k, block), dtype, n, out=flat[r * n: (r + 1) * n])
    return out


def shard_rows(w: torch.Tensor, world: int, mantissa_bits: int | None = None, **kw: Any) -> list[NeuZipTensor]:
    """Compress `w` and split it into `world` row shards the way FSDP2 does (torch.chunk along dim 0)."""
    return list(torch.chunk(NeuZipTensor.from_dense(w, mantissa_bits, **kw), world, 0))


def lane_length(cfg: Any) -> int:
    """`storage.symbols_per_lane` (default SYMBOLS_PER_LANE), checked."""
    spl = int(cfg.get("symbols_per_lane", SYMBOLS_PER_LANE))
    if spl < 1:
        raise ValueError(f"storage.symbols_per_lane must be >= 1, got {spl}")
    return spl
