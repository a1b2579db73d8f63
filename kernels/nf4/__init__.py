"""NF4 (bitsandbytes' 4-bit NormalFloat) blockwise quantize / dequantize, bit-exact with bitsandbytes.

Layout (bitsandbytes `quantize_4bit(quant_type="nf4")`): the tensor is flattened; every `block_size` consecutive
elements share one fp32 absmax; x * (1/absmax) (fp32 reciprocal, as bitsandbytes does) goes to the code whose interval
contains it, intervals split at the fp32 midpoints between neighbouring codes with ties (and NaN from an all-zero
block) going to the LOWER code, exactly like bitsandbytes' `dQuantizeNF4` decision tree; two codes per byte, the first
element in the HIGH nibble. A partial last block / odd length is padded with zeros (bitsandbytes loads zeros there too).

Functions: `quantize_nf4` (pure torch, runs on any device: quantization happens once per weight),
`dequantize_nf4` (dispatcher: Triton on CUDA, `dequantize_nf4_reference` elsewhere) and `dequantize_nf4_triton`.
"""

from __future__ import annotations

import math

import torch

try:  # triton is optional on CPU-only machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

# the 16 NF4 code values (bitsandbytes' table, float32-representable)
NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The code table as an fp32 tensor on `device` (cached)."""
    device = torch.device(device)
    key = ("code", device)
    if key not in _CACHE:
        _CACHE[key] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return _CACHE[key]


def nf4_code_pairs(device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 per packed byte value b: the fp32 bits of code[b >> 4] (low word) and of code[b & 15] (high word), so a
    kernel dequantizes both nibbles of a byte with one 8-byte gather instead of two 4-byte ones (cached)."""
    device = torch.device(device)
    key = ("pairs", device)
    if key not in _CACHE:
        bits = nf4_code("cpu").view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        b = torch.arange(256)
        _CACHE[key] = (bits[b >> 4] | (bits[b & 15] << 32)).to(device)
    return _CACHE[key]


def nf4_midpoints(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 15 fp32 decision thresholds (a+b)/2 between neighbouring codes (== bitsandbytes' tree constants)."""
    device = torch.device(device)
    key = ("mid", device)
    if key not in _CACHE:
        code = nf4_code(device)
        _CACHE[key] = (code[:-1] + code[1:]) / 2
    return _CACHE[key]


def check_block_size(block_size: int) -> None:
    """bitsandbytes accepts power-of-two blocks from 32 to 4096; we need an even size for the byte packing."""
    if block_size not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"NF4 block_size={block_size!r} is not supported; choose one of 32, 64, ..., 4096 (a power of 2)")


def num_blocks(numel: int, block_size: int) -> int:
    return math.ceil(numel / block_size)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (even length) -> bytes, first code in the high nibble."""
    if codes.numel() % 2:
        raise ValueError(f"pack_nibbles needs an even number of codes, got {codes.numel()}")
    c = codes.reshape(-1, 2).to(torch.uint8)
    return (c[:, 0] << 4) | c[:, 1]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """bytes -> uint8 codes (2 per byte, high nibble first)."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)


def quantize_codes(scaled: torch.Tensor) -> torch.Tensor:
    """fp32 values in [-1, 1] -> NF4 code indices (uint8): count of thresholds strictly below x; NaN -> 0."""
    idx = torch.bucketize(scaled, nf4_midpoints(scaled.device), right=False)
    return torch.where(torch.isnan(scaled), 0, idx).to(torch.uint8)


def quantize_nf4(x: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Any float tensor -> (packed uint8 [ceil(n/2)], absmax fp32 [ceil(n/block_size)]), bitsandbytes' NF4 exactly."""
    check_block_size(block_size)
    if not x.is_floating_point():
        raise TypeError(f"quantize_nf4 needs a floating-point tensor, got {x.dtype}")
    n = x.numel()
    if n == 0:
        raise ValueError("quantize_nf4 got an empty tensor")
    nb = num_blocks(n, block_size)
    flat = x.detach().reshape(-1).float()
    if nb * block_size != n:
        flat = torch.nn.functional.pad(flat, (0, nb * block_size - n))
    blocks = flat.view(nb, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * torch.reciprocal(absmax).unsqueeze(1)  # x * (1/absmax), like bitsandbytes (not x / absmax)
    codes = quantize_codes(scaled.reshape(-1))[: n + (n % 2)]
    return pack_nibbles(codes), absmax


def dequantize_nf4_reference(
    packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...], block_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Pure-torch dequantize: code[q] * absmax[block] in fp32, rounded once to `dtype`."""
    n = math.prod(shape)
    codes = unpack_nibbles(packed)[:n].long()
    vals = nf4_code(packed.device)[codes]
    scale = absmax.float().repeat_interleave(block_size)[:n]
    return (vals * scale).to(dtype).reshape(shape)


if triton is not None:

    @triton.jit
    def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes, n_out,
                            BLOCK_SIZE: tl.constexpr, BYTES: tl.constexpr, OUT_BF16: tl.constexpr):
        """Each program expands BYTES packed bytes into 2*BYTES outputs (hi nibble first)."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
        mask = offs < n_bytes
        b = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (b >> 4))
        lo = tl.load(code_ptr + (b & 15))
        scale = tl.load(absmax_ptr + (offs * 2) // BLOCK_SIZE, mask=mask, other=0.0)
        vals = tl.reshape(tl.join(hi * scale, lo * scale), (2 * BYTES,))
        out_offs = pid.to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        if OUT_BF16:  # explicit round-to-nearest-even (the interpreter's bf16 cast truncates); out_ptr is int16 here
            bits = vals.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(out_ptr + out_offs, bits.to(tl.int16), mask=out_offs < n_out)
        else:
            tl.store(out_ptr + out_offs, vals.to(out_ptr.dtype.element_ty), mask=out_offs < n_out)


def dequantize_nf4_triton(
    packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...], block_size: int, dtype: torch.dtype,
    bytes_per_program: int = 1024,
) -> torch.Tensor:
    """Triton dequantize (CUDA, or CPU under TRITON_INTERPRET=1); same result as the reference bit for bit."""
    if triton is None:
        raise RuntimeError("triton is not installed; use dequantize_nf4_reference")
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    n_bytes = packed.numel()
    grid = (triton.cdiv(n_bytes, bytes_per_program),)
    bf16 = dtype == torch.bfloat16
    _nf4_dequant_kernel[grid](packed.reshape(-1), absmax.float().contiguous(), nf4_code(packed.device),
                              out.view(torch.int16) if bf16 else out, n_bytes, n,
                              BLOCK_SIZE=block_size, BYTES=bytes_per_program, OUT_BF16=bf16, num_warps=4)
    return out.reshape(shape)


def dequantize_nf4(
    packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...], block_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Dispatcher: the Triton kernel on CUDA, the pure-torch reference elsewhere."""
    if packed.is_cuda and triton is not None:
        return dequantize_nf4_triton(packed, absmax, shape, block_size, dtype)
    return dequantize_nf4_reference(packed, absmax, shape, block_size, dtype)
