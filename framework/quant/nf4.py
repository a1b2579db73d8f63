"""`NF4Tensor`: a frozen weight stored as bitsandbytes-compatible NF4 (packed 4-bit codes + per-block absmax).

A wrapper tensor subclass (in the style of torchao's NF4Tensor): it reports the original shape and dtype, holds only the
packed form, and dequantizes on use. `F.linear` runs a custom autograd function that dequantizes in forward and again in
backward (no dense copy is kept alive); it gives gradients to the input only, since the weight is frozen. Other ops
fall back to computing on the dequantized tensor. Storage is flat over the whole tensor (exactly bitsandbytes' layout),
so any numel works: a partial last block is padded internally and never shows. `.to(device)`, state_dict save/load,
and FSDP2 sharding (dim-0 shards of the packed data, see `nf4_ops`) are supported.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from memfit.kernels.nf4 import check_block_size, dequantize_nf4, num_blocks, quantize_nf4
from memfit.kernels.nf4.matmul import FUSED_MAX_M, triton
from memfit.quant.nf4_double import dequantize_absmax, dynamic_code, quantize_absmax
from memfit.quant.subclass import StorageTensor, contiguous_strides

fused_mm = None
if triton is not None:
    from memfit.kernels.nf4.matmul import nf4_matmul as fused_mm

aten = torch.ops.aten


class NF4Tensor(StorageTensor):
    """Packed NF4 weight. Inner tensors: `packed` uint8 [ceil(n/2)] and either `absmax` fp32 [nb] or, with double
    quantization, `qabsmax` uint8 [nb] + `absmax2` fp32 [ceil(nb/256)] (+ the python float `offset`)."""

    packed: torch.Tensor
    absmax: torch.Tensor | None
    qabsmax: torch.Tensor | None
    absmax2: torch.Tensor | None

    @staticmethod
    def __new__(cls, packed: torch.Tensor, scales: tuple[torch.Tensor, ...], shape: torch.Size | tuple[int, ...],
                dtype: torch.dtype, block_size: int, offset: float | None = None, requires_grad: bool = False):
        shape = torch.Size(shape)
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, strides=contiguous_strides(shape), dtype=dtype, device=packed.device,
            requires_grad=requires_grad,
        )

    def __init__(self, packed: torch.Tensor, scales: tuple[torch.Tensor, ...], shape: torch.Size | tuple[int, ...],
                 dtype: torch.dtype, block_size: int, offset: float | None = None, requires_grad: bool = False):
        self.packed = packed
        self.block_size = int(block_size)
        self.offset = offset
        if offset is None:
            (self.absmax,) = scales
            self.qabsmax = self.absmax2 = None
        else:
            self.qabsmax, self.absmax2 = scales
            self.absmax = None

    # ------------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, w: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> NF4Tensor:
        """Quantize `w` (any float dtype/shape/device) exactly like bitsandbytes' `quantize_4bit(quant_type='nf4')`
        (with `compress_statistics=double_quant`)."""
        if isinstance(w, NF4Tensor):
            raise TypeError("from_dense got an NF4Tensor; it is already quantized")
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"NF4Tensor.from_dense needs a floating-point tensor, got {getattr(w, 'dtype', type(w))}")
        check_block_size(block_size)
        packed, absmax = quantize_nf4(w, block_size)
        if double_quant:
            qabsmax, absmax2, offset = quantize_absmax(absmax)
            return cls(packed, (qabsmax, absmax2), w.shape, w.dtype, block_size, offset)
        return cls(packed, (absmax,), w.shape, w.dtype, block_size)

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    def scale_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.absmax,) if self.offset is None else (self.qabsmax, self.absmax2)

    def inner_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.packed, *self.scale_tensors())

    def with_inner(self, packed: torch.Tensor, scales: tuple[torch.Tensor, ...], shape: torch.Size | None = None,
                   dtype: torch.dtype | None = None) -> NF4Tensor:
        """A new NF4Tensor with this one's settings and the given inner tensors / outer shape / dtype."""
        return NF4Tensor(packed, scales, self.shape if shape is None else shape, dtype or self.dtype, self.block_size,
                         self.offset)

    # ------------------------------------------------------------------------------------------------ dequantize
    def fp32_absmax(self) -> torch.Tensor:
        """Per-block scales in fp32 (decoding the double quantization if any)."""
        if self.offset is None:
            return self.absmax
        return dequantize_absmax(self.qabsmax, self.absmax2, self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor (in the original dtype unless `dtype` is given); bit-exact with bitsandbytes."""
        return dequantize_nf4(self.packed, self.fp32_absmax(), self.shape, self.block_size, dtype or self.dtype)

    def packed_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.inner_tensors())

    def __repr__(self) -> str:  # the default repr would dequantize through dispatch
        dq = ", double_quant=True" if self.double_quant else ""
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"block_size={self.block_size}{dq})")

    # ------------------------------------------------------------------------------------------------ subclass protocol
    def __tensor_flatten__(self) -> tuple[list[str], tuple[Any, ...]]:
        names = ["packed", "absmax"] if self.offset is None else ["packed", "qabsmax", "absmax2"]
        return names, (self.block_size, self.offset, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], ctx: tuple[Any, ...], outer_size: torch.Size,
                             outer_stride: tuple[int, ...]) -> NF4Tensor:
        block_size, offset, dtype = ctx
        scales = (inner["absmax"],) if offset is None else (inner["qabsmax"], inner["absmax2"])
        return NF4Tensor(inner["packed"], scales, outer_size, dtype, block_size, offset)

    def __reduce_ex__(self, proto: int) -> tuple[Any, ...]:
        """Pickle (torch.save, Lightning checkpoints) as plain inner tensors: torch's generic wrapper-subclass rebuild
        refuses the callable `map_location` that Lightning's checkpoint loading passes."""
        return (_rebuild_nf4, (self.inner_tensors(), tuple(self.shape), str(self.dtype).removeprefix("torch."),
                               self.block_size, self.offset))

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:  # metadata reads inside skip this hook (each would cost a Python round trip)
            with torch._C.DisableTorchFunctionSubclass():
                return nf4_linear(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------ FSDP2 hooks
    def fsdp_pre_all_gather(self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...], module: Any,
                            mp_policy: Any) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...]]:
        """All-gather the packed shard (codes and scales), never a dense copy."""
        return self.inner_tensors(), (self.block_size, self.offset, torch.Size(outer_size))

    def fsdp_post_all_gather(self, outputs: tuple[torch.Tensor, ...], metadata: tuple[Any, ...],
                             param_dtype: torch.dtype, *, out: torch.Tensor | None = None) -> Any:
        """Rebuild the unsharded NF4Tensor on the gathered buffers (re-used in place from the second gather on).

        On a 1-rank mesh FSDP2 (seen with torch 2.13) skips the collective and copies only the FIRST all-gather input
        (the packed codes); this shard is then the whole tensor, so its own scales are used (they are frozen, never
        freed by FSDP2, and not returned as unsharded inner tensors)."""
        block_size, offset, outer_size = metadata
        if out is not None:
            if not isinstance(out, NF4Tensor):
                raise TypeError(f"fsdp_post_all_gather expected an NF4Tensor `out`, got {type(out).__name__}")
            return None
        scales = tuple(outputs[1:])
        if len(outputs) == 1 and self.shape == outer_size:  # FSDP2's 1-rank shortcut (see above)
            scales = self.scale_tensors()
        full = NF4Tensor(outputs[0], scales, outer_size, param_dtype or self.dtype, block_size, offset)
        return full, tuple(outputs)


def _use_fused(a: torch.Tensor, weight: NF4Tensor, width: int) -> bool:
    """The fused kernel serves few rows of a bf16/fp16 CUDA input on a 2-D weight with an even in_features."""
    return (a.is_cuda and fused_mm is not None and a.dtype in (torch.bfloat16, torch.float16) and weight.dim() == 2
            and weight.shape[1] % 2 == 0 and 0 < a.numel() <= FUSED_MAX_M * width)


def nf4_mm(a: torch.Tensor, weight: NF4Tensor, trans: bool = False) -> torch.Tensor:
    """a @ W^T (trans=False) or a @ W (trans=True) over a's last dim: fused dequant-GEMM for few rows (see
    kernels/nf4/matmul.py), else dequantize to a temporary dense weight + cuBLAS (large batch, CPU, fp32)."""
    n, k = weight.shape[0], weight.shape[-1]
    width = n if trans else k
    if _use_fused(a, weight, width):
        code8 = dynamic_code(a.device) if weight.offset is not None else None
        out = fused_mm(a.reshape(-1, width), weight.packed, weight.scale_tensors(), weight.offset, n, k,
                       weight.block_size, trans, code8)
        return out.view(*a.shape[:-1], out.shape[-1])
    w = weight.dequantize(a.dtype)
    return a @ w if trans else a @ w.t()


class _NF4Matmul(torch.autograd.Function):
    """y = x @ W^T with W dequantized just in time (or fused) in forward and in backward; no gradient for W."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: NF4Tensor) -> torch.Tensor:
        ctx.weight = weight
        return nf4_mm(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        with torch._C.DisableTorchFunctionSubclass():
            return nf4_mm(grad, ctx.weight, trans=True), None


def nf4_linear(x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for an NF4 weight; honours autocast (computes in the autocast dtype when it is on)."""
    if weight.requires_grad:
        raise RuntimeError("NF4Tensor weights are frozen: set requires_grad=False (train adapters instead)")
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"F.linear: input has {x.shape[-1]} features but the NF4 weight expects {weight.shape[-1]}")
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if x.requires_grad and torch.is_grad_enabled():
        out = _NF4Matmul.apply(x, weight)
    else:  # no graph to record: skip the autograd.Function machinery
        out = nf4_mm(x, weight)
    return out if bias is None else out + bias.to(out.dtype)


def nf4_num_blocks(numel: int, block_size: int) -> int:
    """Number of absmax blocks for `numel` elements (re-exported for callers sizing buffers)."""
    return num_blocks(numel, block_size)


torch.serialization.add_safe_globals([NF4Tensor])


def _rebuild_nf4(inner: tuple[torch.Tensor, ...], shape: tuple[int, ...], dtype: str, block_size: int,
                 offset: float | None) -> NF4Tensor:
    """Inverse of NF4Tensor.__reduce_ex__, with the checks a file read needs (the inner tensors come from disk)."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"NF4 checkpoint entry: unsupported dtype {dtype!r}")
    check_block_size(block_size)
    n = math.prod(shape)
    if len(inner) not in (2, 3) or (len(inner) == 3) != (offset is not None):
        raise ValueError("NF4 checkpoint entry: wrong number of inner tensors")
    packed, *scales = inner
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"NF4 checkpoint entry: {packed.numel()} packed bytes for {n} weights")
    if scales[0].numel() != -(-n // block_size):
        raise ValueError(f"NF4 checkpoint entry: {scales[0].numel()} block scales for {n} weights")
    return NF4Tensor(packed, tuple(scales), torch.Size(shape), getattr(torch, dtype), block_size, offset)


# Lightning loads checkpoints with weights_only=True: allow the rebuild (it checks every size it is given)
torch.serialization.add_safe_globals([_rebuild_nf4])
