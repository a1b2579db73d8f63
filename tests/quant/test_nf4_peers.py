"""NF4 storage against peers and closed forms: the packed bytes and scales against bitsandbytes' CPU `quantize_4bit`,
the dequantized values against a float64 closed form and bitsandbytes' pure-torch dequantizer, and device/dtype moves
(`.to(dtype)`, `.to("meta")`, `.to("cpu")`, `.to("cuda")`) of CPU-built NF4 and NeuZip weights.

What must be equal bit for bit, and why: NF4 codes are a nearest-code search whose decision thresholds are fp32
constants, and the scale is the block's absmax (a max of representable values), so two implementations that follow
bitsandbytes' definition produce the same bytes for every input. Dequantization is one fp32 product code * absmax
rounded once to the weight's dtype: again one correctly rounded result, bit-exact. The one documented exception is the
second-level (double) quantization of the scales, see test_double_quant_against_bitsandbytes_cpu.
"""

from __future__ import annotations

import pytest
import torch

bnb_f = pytest.importorskip("bitsandbytes.functional")  # a dev dependency; its CPU backend runs anywhere

from memfit.kernels.nf4 import NF4_CODE, unpack_nibbles  # noqa: E402
from memfit.quant import NF4Tensor  # noqa: E402
from memfit.quant.neuzip import NeuZipTensor  # noqa: E402
from memfit.quant.nf4_double import DQ_BLOCK, dynamic_code  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, cols): a whole number of blocks, and a numel (33*70 = 2310) that ends in a partial block of every block size
SHAPES = [(64, 96), (33, 70)]


def weight(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_nf4_bytes_equal_bitsandbytes_cpu(shape, block_size, dtype):
    """Packed codes (two per byte, high nibble first) and fp32 absmax: bit-exact with bitsandbytes."""
    w = weight(shape, dtype, seed=block_size + shape[0])
    q = NF4Tensor.from_dense(w, block_size)
    ref_packed, ref_state = bnb_f.quantize_4bit(w, blocksize=block_size, quant_type="nf4")
    assert q.packed.dtype == torch.uint8 and ref_packed.dtype == torch.uint8
    assert torch.equal(q.packed, ref_packed.reshape(-1))
    assert q.absmax.dtype == ref_state.absmax.dtype == torch.float32
    assert torch.equal(q.absmax.view(torch.int32), ref_state.absmax.view(torch.int32))
    assert torch.equal(torch.tensor(NF4_CODE, dtype=torch.float32), ref_state.code.float())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_nf4_dequantize_equals_closed_form_and_bitsandbytes(shape, dtype):
    """dequantize = fl_dtype(code[c] * absmax) with the product in fp32. Reference 1: the float64 product of the
    bitsandbytes codes and scales, rounded to fp32 then to the dtype (the fp32 product of two fp32 numbers is the
    correctly rounded float64 one, as float64 holds a 24x24-bit product exactly). Reference 2: bitsandbytes'
    pure-torch dequantizer (its native CPU dequantizer is not used: it disagrees with both)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    w = weight(shape, dtype, seed=7)
    ref_packed, st = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
    n = w.numel()
    codes = unpack_nibbles(ref_packed.reshape(-1))[:n].long()
    scale = st.absmax.double().repeat_interleave(64)[:n]
    closed = (torch.tensor(NF4_CODE, dtype=torch.float64)[codes] * scale).float().to(dtype).view(shape)
    got = NF4Tensor.from_dense(w, 64).dequantize()
    assert got.dtype == dtype and torch.equal(got, closed)
    peer = _dequantize_4bit_compute(ref_packed.reshape(-1), st.absmax, st.code, 64, w.shape, dtype)
    assert torch.equal(got, peer)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_double_quant_against_bitsandbytes_cpu(dtype):
    """compress_statistics=True: the offset (mean absmax) and the second-level fp32 scales are bit-exact; the 8-bit
    codes of the centred scales follow bitsandbytes' CUDA binary search, which picks the nearest dynamic-code value.
    bitsandbytes' CPU kernel picks the farther neighbour for values within a relative 1e-3 of the code spacing of a
    midpoint (fp32 midpoint arithmetic); there the two may differ by one code, and memfit's must be the nearer one in
    float64. 2000 blocks of 64 give 2000 scales (8 second-level blocks, the last partial)."""
    w = weight((1000, 128), dtype, seed=3)
    q = NF4Tensor.from_dense(w, 64, double_quant=True)
    ref_packed, st = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q.packed, ref_packed.reshape(-1))
    assert q.offset == float(st.offset)  # both the fp32 mean of the same fp32 vector
    assert torch.equal(q.absmax2.view(torch.int32), st.state2.absmax.view(torch.int32))
    assert q.absmax2.numel() == -(-2000 // DQ_BLOCK)
    ours, theirs = q.qabsmax.long(), st.absmax.long()
    code = dynamic_code().double()
    absmax = NF4Tensor.from_dense(w, 64).absmax.double()
    x = (absmax - q.offset) / q.absmax2.double().repeat_interleave(DQ_BLOCK)[: absmax.numel()]
    d_ours, d_theirs = (x - code[ours]).abs(), (x - code[theirs]).abs()
    differ = ours != theirs
    assert differ.sum() <= 0.01 * differ.numel(), int(differ.sum())
    assert torch.all((ours - theirs)[differ].abs() == 1)
    assert torch.all(d_ours[differ] <= d_theirs[differ])
    # everywhere, memfit's code is the float64-nearest one up to fp32 rounding of x (one ulp of |x| <= 1: 2**-24)
    nearest = (x[:, None] - code[None, :]).abs().min(1).values
    assert torch.all(d_ours <= nearest + 2.0**-23)
    # and the decoded scales are within half a code step of the true absmax (the dynamic code's spacing near x)
    assert torch.allclose(q.fp32_absmax().double(), absmax, rtol=0, atol=float(q.absmax2.max()) * 0.0071)


# ---------------------------------------------------------------------------------------------------- device moves
def _nf4(double_quant: bool) -> tuple[torch.Tensor, NF4Tensor]:
    w = weight((40, 96), torch.bfloat16, seed=11)
    return w, NF4Tensor.from_dense(w, 64, double_quant=double_quant)


def _same_inner(a: NF4Tensor, b: NF4Tensor) -> None:
    for x, y in zip(a.inner_tensors(), b.inner_tensors(), strict=True):
        assert torch.equal(x.cpu(), y.cpu())
    assert a.offset == b.offset and a.block_size == b.block_size


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_to_dtype_meta_cpu_round_trips(double_quant):
    """`.to(dtype)` changes only the dtype dequantize produces (the packed bytes are untouched, so bf16 -> fp32 ->
    bf16 is lossless); `.to("meta")` keeps shape/dtype and dequantizes to a meta tensor; `.to("cpu")` is a no-op."""
    w, q = _nf4(double_quant)
    ref32 = q.dequantize(torch.float32)  # the fp32 product code * absmax, before rounding to bf16
    f32 = q.to(torch.float32)
    assert isinstance(f32, NF4Tensor) and f32.dtype == torch.float32
    _same_inner(f32, q)
    assert torch.equal(f32.dequantize(), ref32)
    back = f32.to(torch.bfloat16)
    assert torch.equal(back.dequantize(), q.dequantize()) and torch.equal(q.dequantize(), ref32.to(torch.bfloat16))
    cpu = q.to("cpu")
    _same_inner(cpu, q)
    assert torch.equal(cpu.dequantize(), q.dequantize())
    meta = q.to("meta")
    assert isinstance(meta, NF4Tensor) and meta.device.type == "meta" and meta.shape == w.shape
    assert all(t.device.type == "meta" for t in meta.inner_tensors())
    d = meta.dequantize()
    assert d.device.type == "meta" and d.shape == w.shape and d.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="floating-point"):
        q.to(torch.int8)


@pytest.mark.parametrize("mantissa_bits", [None, 3])
def test_neuzip_to_dtype_meta_cpu_round_trips(mantissa_bits):
    """NeuZip: lossless (None) decodes to the very bits compressed; lossy (3 mantissa bits) to the float64 closed
    form rounding of the mantissa to 3 bits, ties away from zero (the codec's documented rounding). `.to(fp32)` gives
    the same values re-compressed in fp32 (and back), `.to(float64)` a dense tensor, `.to("cpu")` keeps the
    compressed form, `.to("meta")` keeps shape/dtype and decodes to a meta tensor."""
    w = weight((40, 96), torch.bfloat16, seed=5)
    z = NeuZipTensor.from_dense(w, mantissa_bits)
    dense = z.dequantize()
    if mantissa_bits is None:
        assert torch.equal(dense.view(torch.int16), w.view(torch.int16))
    else:
        # round |w| to 3 mantissa bits in float64: step = 2**floor(log2|w|) / 8 (no zeros, subnormals or overflow in
        # this sample: every |w| is a normal bf16 far from both ends of the range)
        a = w.double().abs()
        assert a.min() > 2.0**-100 and a.max() < 2.0**100
        step = torch.exp2(torch.floor(torch.log2(a))) / 8
        ref = (torch.floor(a / step + 0.5) * step * w.double().sign()).to(torch.bfloat16)
        assert torch.equal(dense, ref)
    f32 = z.to(torch.float32)  # re-compressed in fp32 (bf16 values are exact in fp32), same kept mantissa bits
    assert isinstance(f32, NeuZipTensor) and f32.dtype == torch.float32
    assert f32.mantissa_bits == (23 if mantissa_bits is None else mantissa_bits)
    assert torch.equal(f32.dequantize(), dense.float())
    assert torch.equal(f32.to(torch.bfloat16).dequantize().view(torch.int16), dense.view(torch.int16))
    assert type(z.to(torch.float64)) is torch.Tensor and torch.equal(z.to(torch.float64), dense.double())
    cpu = z.to("cpu")
    assert isinstance(cpu, NeuZipTensor) and torch.equal(cpu.dequantize().view(torch.int16), dense.view(torch.int16))
    meta = z.to("meta")
    assert isinstance(meta, NeuZipTensor) and meta.device.type == "meta" and meta.shape == w.shape
    d = meta.dequantize()
    assert d.device.type == "meta" and d.shape == w.shape and d.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_built_on_cpu_moves_to_cuda_bit_exact(double_quant):
    """A CPU-built NF4 weight moved to CUDA keeps its bytes and dequantizes (CUDA kernel) to the CPU result."""
    w, q = _nf4(double_quant)
    g = q.to("cuda")
    assert isinstance(g, NF4Tensor) and g.device.type == "cuda"
    assert all(t.device.type == "cuda" for t in g.inner_tensors())
    _same_inner(g, q)
    assert torch.equal(g.dequantize().cpu(), q.dequantize())
    assert torch.equal(g.to("cpu").dequantize(), q.dequantize())
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    w_bf16 = q.dequantize().double()
    ref = x.double() @ w_bf16.t()
    got = torch.nn.functional.linear(x.cuda(), g).cpu().double()
    # fp32 accumulation over 96 terms (96 * 2**-24), a weight the fused kernel may keep in fp32 instead of rounding it
    # to bf16 first (2**-8 relative per weight), and the output's bf16 rounding (2**-8 of |ref|)
    bound = (96 * 2.0**-24 + 2.0**-8) * (x.double().abs() @ w_bf16.abs().t()) + 2.0**-8 * ref.abs()
    assert torch.all((got - ref).abs() <= bound)


@pytest.mark.gpu
@pytest.mark.parametrize("mantissa_bits", [None, 3])
def test_neuzip_built_on_cpu_moves_to_cuda_bit_exact(mantissa_bits):
    """A CPU-built NeuZip weight moved to CUDA decodes (Triton kernel) to the bits the CPU decoder gives."""
    w = weight((40, 96), torch.bfloat16, seed=5)
    z = NeuZipTensor.from_dense(w, mantissa_bits)
    g = z.to("cuda")
    assert isinstance(g, NeuZipTensor) and g.device.type == "cuda" and g.packed.device.type == "cuda"
    assert torch.equal(g.dequantize().cpu().view(torch.int16), z.dequantize().view(torch.int16))
    assert torch.equal(g.to("cpu").dequantize().view(torch.int16), z.dequantize().view(torch.int16))


@pytest.mark.parametrize("storage", ["nf4", "neuzip", "neuzip_lossy"])
@pytest.mark.parametrize("to", [torch.bfloat16, torch.float16, torch.float32])
def test_module_to_dtype_keeps_stored_weights_correct(storage, to):
    """`module.to(dtype)` (what Lightning's bf16-true / 16-true precision does to the model) on a layer whose fp32
    weight is stored compressed: the weight stays compressed and decodes to the original weight cast to the new dtype
    (NF4: the same fp32 product code * absmax, rounded once to the dtype; NeuZip lossless: the fp32 values rounded to
    the dtype; lossy: the 3-bit-mantissa values, exact in every dtype here), and the layer computes with it."""
    from torch import nn

    w = weight((40, 96), torch.float32, seed=9)
    w = w.sign() * w.abs().clamp(min=1e-2)  # normal numbers in fp16 too (fp16 subnormals hold fewer mantissa bits)
    if storage == "nf4":
        stored = NF4Tensor.from_dense(w, 64)
    else:
        stored = NeuZipTensor.from_dense(w, 3 if storage == "neuzip_lossy" else None)
    want = stored.dequantize().to(to)  # fp32 decode, then one rounding (lossy values are exact in bf16/fp16)
    lin = nn.Linear(96, 40, bias=False)
    lin.weight = nn.Parameter(stored, requires_grad=False)
    lin.to(to)
    got = lin.weight
    assert type(got) is type(stored) and got.dtype == to
    assert torch.equal(got.dequantize(), want)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(1)).to(to)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, want))
