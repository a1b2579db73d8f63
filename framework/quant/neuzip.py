"""NeuZipTensor: a frozen weight kept entropy-coded (exponents through kernels.ans, sign+mantissa packed raw).

Behaves as a tensor of the original shape and dtype: `F.linear` decodes the weight just in time in forward and again
in backward (only the compressed form is saved for autograd, so one layer's dense weight is alive at a time); any
other op decodes and runs densely. `torch.save`/state_dict carry the compressed bytes; `copy_` from another
NeuZipTensor (load_state_dict) adopts its compressed form. FSDP2: `fsdp_pre_all_gather` sends this shard's bytes
padded to `fsdp_pad_to` (the largest shard, fixed once weights are compressed) and `fsdp_post_all_gather` decodes the
gathered shards into the dense weight (see `shard_rows` for how shards are made).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from framework.quant import neuzip_codec as codec
from kernels.ans import ANSEncoded, ans_decode, ans_encode

_MAGIC = b"NZIP"
_VERSION = 1
_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# magic, version, dtype code, mantissa bits, ndim, block (0 = none), ans bytes, packed bytes, scales count, crc32 of
# everything after the header (the rANS part has its own checksum too; this one also covers packed bits and scales)
_HEAD = struct.Struct("<4sBBBBIQQQI")
SYMBOLS_PER_LANE = 2048


class NeuZipTensor(torch.Tensor):
    """Compressed frozen weight; see the module docstring."""

    enc: ANSEncoded
    packed: torch.Tensor
    scales: torch.Tensor | None
    mantissa_bits: int
    block: int | None
    fsdp_pad_to: int | None

    @staticmethod
    def __new__(cls, enc, packed, scales, shape, dtype, mantissa_bits, block):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device, requires_grad=False)

    def __init__(self, enc: ANSEncoded, packed: torch.Tensor, scales: torch.Tensor | None, shape: torch.Size,
                 dtype: torch.dtype, mantissa_bits: int, block: int | None):
        self.enc, self.packed, self.scales = enc, packed, scales
        self.mantissa_bits, self.block = mantissa_bits, block
        self.fsdp_pad_to = None

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
        enc = ans_encode(exps, lanes=lanes)
        packed = codec.pack_bits(signman, 1 + k)
        return cls(enc, packed, scales, w.shape, w.dtype, k, block)

    def dequantize(self) -> torch.Tensor:
        """Decode into a fresh dense tensor on this tensor's device."""
        dev = self.packed.device
        exps = ans_decode(self.enc, dev, validate=False)
        signman = codec.unpack_bits(self.packed, 1 + self.mantissa_bits, self.numel())
        return codec.combine(exps, signman, self.mantissa_bits, self.dtype, self.scales, self.block).view(self.shape)

    @property
    def compressed_nbytes(self) -> int:
        """Bytes of to_bytes(): header, shape, rANS stream (with its tables), packed bits and block scales."""
        sc = 0 if self.scales is None else 4 * self.scales.numel()
        return _HEAD.size + 8 * self.dim() + self.enc.nbytes + self.packed.numel() + sc

    def to_bytes(self) -> bytes:
        a = self.enc.to_bytes()
        sc = b"" if self.scales is None else self.scales.float().cpu().numpy().astype("<f4").tobytes()
        body = b"".join([struct.pack(f"<{self.dim()}q", *self.shape), a, self.packed.cpu().numpy().tobytes(), sc])
        head = _HEAD.pack(_MAGIC, _VERSION, _DTYPES.index(self.dtype), self.mantissa_bits, self.dim(),
                          self.block or 0, len(a), self.packed.numel(), 0 if self.scales is None else self.scales.numel(),
                          zlib.crc32(body))
        return head + body

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview, device: torch.device | str = "cpu") -> NeuZipTensor:
        """Parse a serialised NeuZipTensor; ValueError naming the problem on truncated or corrupt input."""
        buf = memoryview(buf).cast("B")
        if len(buf) < _HEAD.size:
            raise ValueError(f"NeuZip buffer truncated: {len(buf)} bytes, header needs {_HEAD.size}")
        magic, ver, dcode, k, ndim, block, na, npk, nsc, crc = _HEAD.unpack_from(buf)
        if magic != _MAGIC or ver != _VERSION:
            raise ValueError(f"not a NeuZip v{_VERSION} buffer (magic {bytes(magic)!r}, version {ver})")
        if dcode >= len(_DTYPES):
            raise ValueError(f"corrupt NeuZip header: dtype code {dcode}")
        dtype = _DTYPES[dcode]
        codec.check_mantissa_bits(dtype, k)
        need = _HEAD.size + 8 * ndim + na + npk + 4 * nsc
        if len(buf) != need:
            raise ValueError(f"NeuZip buffer is {len(buf)} bytes, its header describes {need} (truncated or padded)")
        if zlib.crc32(buf[_HEAD.size:]) != crc:
            raise ValueError("corrupt NeuZip buffer: checksum mismatch")
        pos = _HEAD.size + 8 * ndim
        shape = torch.Size(struct.unpack_from(f"<{ndim}q", buf, _HEAD.size))
        n = shape.numel()
        enc = ANSEncoded.from_bytes(buf[pos: pos + na])
        if enc.n != n:
            raise ValueError(f"NeuZip exponent stream holds {enc.n} symbols for a tensor of {n} elements")
        packed = torch.frombuffer(bytearray(buf[pos + na: pos + na + npk]), dtype=torch.uint8)
        if packed.numel() != codec.packed_nbytes(n, 1 + k):
            raise ValueError(f"NeuZip sign/mantissa section has {packed.numel()} bytes, expected "
                             f"{codec.packed_nbytes(n, 1 + k)}")
        scales = None
        if block:
            expect = -(-n // block)
            if nsc != expect:
                raise ValueError(f"NeuZip has {nsc} block scales, expected {expect}")
            scales = torch.frombuffer(bytearray(buf[pos + na + npk:]), dtype=torch.float32).to(device)
        return cls(enc.to(device), packed.to(device), scales, shape, dtype, k, block or None)

    def __reduce_ex__(self, proto):
        # a uint8 tensor, not bytes: torch.save stores tensors as raw storages (protocol-2 bytes would be re-encoded)
        return (_rebuild, (torch.frombuffer(bytearray(self.to_bytes()), dtype=torch.uint8), str(self.device)))

    def __repr__(self, *, tensor_contents=None) -> str:
        return (f"NeuZipTensor(shape={tuple(self.shape)}, dtype={self.dtype}, mantissa_bits={self.mantissa_bits}, "
                f"bits/weight={8 * self.compressed_nbytes / max(1, self.numel()):.3f})")

    def _to(self, device: torch.device) -> NeuZipTensor:
        sc = None if self.scales is None else self.scales.to(device)
        out = NeuZipTensor(self.enc.to(device), self.packed.to(device), sc, self.shape, self.dtype,
                           self.mantissa_bits, self.block)
        out.fsdp_pad_to = self.fsdp_pad_to
        return out

    # ---- FSDP2 all-gather extension ------------------------------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh: Any = None, *args: Any, **kwargs: Any):
        """Send this shard's serialised bytes, zero-padded to the common size `fsdp_pad_to`."""
        raw = torch.frombuffer(bytearray(self.to_bytes()), dtype=torch.uint8)
        pad_to = self.fsdp_pad_to or raw.numel()
        if raw.numel() > pad_to:
            raise ValueError(f"NeuZip shard of {raw.numel()} bytes exceeds fsdp_pad_to={pad_to}")
        head = torch.tensor([raw.numel()], dtype=torch.int64).view(torch.uint8)
        buf = torch.cat([head, raw, raw.new_zeros(pad_to - raw.numel())]).to(self.packed.device)
        return (buf,), pad_to + 8

    def fsdp_post_all_gather(self, all_gather_outputs: tuple[torch.Tensor, ...], metadata: Any,
                             param_dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None):
        """Decode every rank's shard (rows split along dim 0) and concatenate them into the dense weight."""
        (gathered,) = all_gather_outputs
        dense = gather_dense(gathered, metadata, self.packed.device)
        if param_dtype is not None:
            dense = dense.to(param_dtype)
        if out is not None:
            out.copy_(dense)
            return
        return dense, (gathered,)

    # ---- torch integration ---------------------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], NeuZipTensor):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return _NeuZipLinear.apply(args[0], args[1], bias)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("detach", "alias", "clone") and isinstance(args[0], NeuZipTensor):
            return args[0]._to(args[0].packed.device)
        if name == "_to_copy" and isinstance(args[0], NeuZipTensor) and set(kwargs) <= {"device", "non_blocking"}:
            return args[0]._to(kwargs.get("device") or args[0].packed.device)
        if name == "copy_" and isinstance(args[0], NeuZipTensor):
            dst, src = args[0], args[1]
            if not isinstance(src, NeuZipTensor):
                src = NeuZipTensor.from_dense(src.to(dst.dtype), dst.mantissa_bits, block=dst.block)
            if src.shape != dst.shape:
                raise ValueError(f"copy_ into NeuZipTensor of shape {tuple(dst.shape)} from {tuple(src.shape)}")
            moved = src._to(dst.packed.device)
            dst.enc, dst.packed, dst.scales = moved.enc, moved.packed, moved.scales
            dst.mantissa_bits, dst.block = moved.mantissa_bits, moved.block
            return dst
        if func in (torch.ops.aten.is_same_size.default,):
            return args[0].shape == args[1].shape
        dense = tree_map(lambda t: t.dequantize() if isinstance(t, NeuZipTensor) else t, (args, kwargs))
        return func(*dense[0], **dense[1])


def _rebuild(buf: torch.Tensor, device: str) -> NeuZipTensor:
    return NeuZipTensor.from_bytes(buf.numpy().tobytes(), device)


class _NeuZipLinear(torch.autograd.Function):
    """y = x W^T + b with W decoded in forward and again in backward; gradients flow to x and b only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: NeuZipTensor, bias: torch.Tensor | None):
        ctx.w = w
        ctx.has_bias = bias is not None
        with torch._C.DisableTorchFunctionSubclass():
            return F.linear(x, w.dequantize().to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gx = grad @ ctx.w.dequantize().to(grad.dtype) if ctx.needs_input_grad[0] else None
        gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, None, gb


def gather_dense(gathered: torch.Tensor, stride: int, device: torch.device | str) -> torch.Tensor:
    """Decode equal-size per-rank buffers ([u64 size][NeuZip bytes][zero pad], `stride` bytes each) and concatenate."""
    raw = gathered.cpu().contiguous()
    if raw.numel() % stride:
        raise ValueError(f"gathered NeuZip buffer of {raw.numel()} bytes is not a multiple of the shard size {stride}")
    parts = []
    for r in range(raw.numel() // stride):
        chunk = raw[r * stride: (r + 1) * stride]
        size = int(chunk[:8].clone().view(torch.int64))
        if not 0 < size <= stride - 8:
            raise ValueError(f"corrupt NeuZip shard {r}: size prefix {size} outside 1..{stride - 8}")
        parts.append(NeuZipTensor.from_bytes(chunk[8: 8 + size].numpy().tobytes(), device).dequantize())
    return torch.cat(parts, 0)


def shard_rows(w: torch.Tensor, world: int, mantissa_bits: int | None = None, **kw: Any) -> list[NeuZipTensor]:
    """Compress each rank's row chunk of `w` and set every shard's fsdp_pad_to to the largest serialised size."""
    shards = [NeuZipTensor.from_dense(c, mantissa_bits, **kw) for c in torch.chunk(w, world, 0)]
    pad = max(s.compressed_nbytes for s in shards)
    for s in shards:
        s.fsdp_pad_to = pad
    return shards


def apply_neuzip(model: nn.Module, cfg: Any) -> nn.Module:
    """Replace frozen Linear (and optionally Embedding / lm_head) weights by NeuZipTensors, in place."""
    k = cfg.get("mantissa_bits", None)
    if cfg.get("name") == "neuzip_lossy" and k not in (0, 1, 3):
        raise ValueError(f"storage=neuzip_lossy needs mantissa_bits in [0, 1, 3], got {k}")
    block = cfg.get("block_size", None)
    include_embeddings = bool(cfg.get("include_embeddings", False))
    min_numel = int(cfg.get("min_numel", 4096))
    for name, mod in model.named_modules():
        is_lin = isinstance(mod, nn.Linear)
        is_emb = isinstance(mod, nn.Embedding) or name.endswith("lm_head")
        if not (is_lin or (include_embeddings and is_emb)) or (is_emb and not include_embeddings):
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or w.requires_grad or isinstance(w, NeuZipTensor) or w.numel() < min_numel:
            continue
        if w.dtype not in codec.FORMATS:
            continue
        mod.weight = nn.Parameter(NeuZipTensor.from_dense(w.data, k, block=block), requires_grad=False)
    return model
