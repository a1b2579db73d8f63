"""NF4 storage: code table, rounding vs an independent float64 nearest-code search, packing, double quantization,
dequantize (reference and Triton interpreter), odd shapes, state_dict round trip."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from interp import interpreted
from memfit.kernels.nf4 import (
    NF4_CODE,
    dequantize_nf4_reference,
    nf4_midpoints,
    pack_nibbles,
    quantize_nf4,
    unpack_nibbles,
)
from memfit.quant import NF4Tensor
from memfit.quant.nf4_double import DQ_BLOCK, dequantize_absmax, dynamic_map_values, quantize_absmax

ROOT = Path(__file__).resolve().parents[2]
CODE64 = torch.tensor(NF4_CODE, dtype=torch.float64)


def nearest_codes_f64(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Independent reference: float64 blockwise absmax scaling and argmin |x/absmax - code| (ties: lower code).
    Also returns the float64 distance of each scaled value to its nearest decision midpoint (ambiguity margin)."""
    flat = x.reshape(-1).double()
    n = flat.numel()
    nb = math.ceil(n / block_size)
    padded = torch.cat([flat, flat.new_zeros(nb * block_size - n)]).view(nb, block_size)
    absmax = padded.abs().amax(1, keepdim=True)
    scaled = (padded / absmax).reshape(-1)[:n]
    dist = (scaled[:, None] - CODE64[None, :]).abs()
    codes = dist.argmin(1)  # argmin returns the first (lower) index on exact ties
    mids64 = (CODE64[:-1] + CODE64[1:]) / 2
    margin = (scaled[:, None] - mids64[None, :]).abs().amin(1)
    return codes, absmax.reshape(-1).float(), margin


def test_code_table_is_bitsandbytes_nf4():
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    assert code.numel() == 16 and code[0] == -1 and code[7] == 0 and code[15] == 1
    assert torch.all(code[1:] > code[:-1])
    # the NF4 construction (QLoRA appendix): 8 positive / 7 negative normal quantiles, normalised to [-1, 1]
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    offset = 0.9677083
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64))[:-1]
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64))[:-1]
    vals = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    vals = vals / vals.abs().max()
    torch.testing.assert_close(code.double(), vals, atol=1e-6, rtol=0)
    # fp32 thresholds equal the fp32-rounded float64 midpoints (what bitsandbytes' decision tree hard-codes)
    torch.testing.assert_close(nf4_midpoints().double(), ((CODE64[:-1] + CODE64[1:]) / 2).float().double(), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [64, 128])
def test_rounding_matches_float64_nearest_code(dtype, block_size):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(96, 160, generator=g) * torch.rand(96, 1, generator=g) * 3).to(dtype)
    packed, absmax = quantize_nf4(x, block_size)
    codes = unpack_nibbles(packed)[: x.numel()].long()
    ref_codes, ref_absmax, margin = nearest_codes_f64(x, block_size)
    torch.testing.assert_close(absmax, ref_absmax, atol=0, rtol=0)  # absmax is exact (max of representable values)
    clear = margin > 1e-6  # away from a decision midpoint, fp32 x*(1/absmax) cannot change the nearest code
    assert clear.float().mean() > 0.999
    assert torch.equal(codes[clear], ref_codes[clear])
    assert torch.all((codes[~clear] - ref_codes[~clear]).abs() <= 1)


def test_ties_go_to_the_lower_code_and_extremes():
    mids = nf4_midpoints()
    x = torch.cat([torch.tensor([1.0]), mids, -torch.ones(1), torch.tensor(NF4_CODE)])  # absmax 1 in the one block
    codes = unpack_nibbles(quantize_nf4(x, 32)[0])[: x.numel()]
    assert codes[0] == 15
    assert torch.equal(codes[1:16].long(), torch.arange(15))  # x == midpoint(i, i+1) -> i, as bitsandbytes' `x > t`
    assert codes[16] == 0
    assert torch.equal(codes[17:].long(), torch.arange(16))  # every code value maps to itself


def test_zero_block_and_padding_nibble():
    x = torch.zeros(64 + 3)
    x[64:] = torch.tensor([0.5, -0.25, 1.0])
    packed, absmax = quantize_nf4(x, 64)
    assert packed.numel() == 34 and absmax.tolist() == [0.0, 1.0]
    codes = unpack_nibbles(packed)
    # all-zero block: 0 * (1/0) = NaN -> lowest code, as in bitsandbytes' CUDA kernel; dequantizes to 0
    assert torch.all(codes[:64] == 0)
    assert codes[67] == 7  # odd length: the pad element is a quantized 0.0 (code 7)
    out = dequantize_nf4_reference(packed, absmax, (67,), 64, torch.float32)
    assert torch.equal(out[:64], torch.zeros(64))
    assert torch.equal(out[64:], torch.tensor([NF4_CODE[12], NF4_CODE[4], 1.0]))  # 0.5 < mid(12, 13) = 0.5017


def test_pack_unpack_high_nibble_first():
    codes = torch.randint(0, 16, (1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_nibbles(codes)
    assert torch.equal(packed, codes[0::2] * 16 + codes[1::2])
    assert torch.equal(unpack_nibbles(packed), codes)
    with pytest.raises(ValueError, match="even number"):
        pack_nibbles(codes[:3])


@pytest.mark.parametrize("shape", [(64, 64), (33, 7), (5,), (3, 5, 41), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_matches_float64_formula_any_shape(shape, dtype):
    """Shapes not divisible by 64 are supported (padded internally, bitsandbytes' flat layout); none is an error."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    t = NF4Tensor.from_dense(x)
    assert t.shape == x.shape and t.dtype == dtype
    assert t.packed.numel() == math.ceil(x.numel() / 2) and t.absmax.numel() == math.ceil(x.numel() / 64)
    codes = unpack_nibbles(t.packed)[: x.numel()].long()
    ref = (CODE64[codes] * t.absmax.double().repeat_interleave(64)[: x.numel()]).to(dtype).reshape(shape)
    out = t.dequantize()
    assert out.dtype == dtype and torch.equal(out, ref)
    # 4-bit error bound: half the widest code gap times absmax
    gap = (CODE64[1:] - CODE64[:-1]).max().item() / 2
    bound = gap * t.absmax.repeat_interleave(64)[: x.numel()].reshape(shape) + 1e-2 * x.float().abs()
    assert torch.all((out.float() - x.float()).abs() <= bound + 1e-6)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="block_size"):
        NF4Tensor.from_dense(torch.randn(8, 8), block_size=48)
    with pytest.raises(TypeError, match="floating-point"):
        NF4Tensor.from_dense(torch.ones(8, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="already quantized"):
        NF4Tensor.from_dense(NF4Tensor.from_dense(torch.randn(8, 8)))


def test_dynamic_map_closed_form():
    vals = torch.tensor(dynamic_map_values(), dtype=torch.float64)
    expect = [0.0, 1.0]
    for i in range(7):  # decade 10^(i-6): midpoints of a linspace(0.1, 1, 2^i + 1)
        grid = [0.1 + 0.9 * k / 2**i for k in range(2**i + 1)]
        mids = [10 ** (i - 6) * (a + b) / 2 for a, b in zip(grid[:-1], grid[1:])]
        expect += mids + [-m for m in mids]
    expect = torch.tensor(sorted(expect), dtype=torch.float64)
    assert vals.numel() == 256
    torch.testing.assert_close(vals, expect, rtol=1e-6, atol=0)


def test_double_quant_codes_are_nearest_and_bounded():
    g = torch.Generator().manual_seed(3)
    absmax = torch.rand(1000, generator=g) * 0.2 + 0.01
    codes, absmax2, offset = quantize_absmax(absmax)
    assert codes.dtype == torch.uint8 and absmax2.numel() == math.ceil(1000 / DQ_BLOCK)
    assert offset == pytest.approx(absmax.double().mean().item(), rel=1e-6)
    centred = absmax.double() - offset
    scale = absmax2.double().repeat_interleave(DQ_BLOCK)[:1000]
    table = torch.tensor(dynamic_map_values(), dtype=torch.float64)
    dist = (centred[:, None] / scale[:, None] - table[None, :]).abs()
    nearest = dist.min(1).values
    chosen = dist.gather(1, codes.long()[:, None]).squeeze(1)
    assert torch.all(chosen <= nearest + 1e-6)  # the binary search lands on a nearest code
    deq = dequantize_absmax(codes, absmax2, offset)
    torch.testing.assert_close(deq.double(), table[codes.long()] * scale + offset, rtol=1e-6, atol=1e-9)
    assert torch.all((deq.double() - absmax.double()).abs() <= scale * 0.05 + 1e-7)


def test_double_quant_tensor_dequantizes_with_decoded_scales():
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(4))
    t1, t2 = NF4Tensor.from_dense(w), NF4Tensor.from_dense(w, double_quant=True)
    assert torch.equal(t1.packed, t2.packed)  # codes depend on the exact fp32 absmax, not the compressed one
    out = t2.dequantize()
    codes = unpack_nibbles(t2.packed).long()
    ref = (CODE64[codes] * t2.fp32_absmax().double().repeat_interleave(64)).float().view(256, 128)
    assert torch.equal(out, ref)
    assert t2.packed_nbytes() < t1.packed_nbytes() and (out - t1.dequantize()).abs().max() < 0.05


def _interpreted_kernels():
    return interpreted("nf4/__init__.py")


@pytest.mark.parametrize("shape,block_size", [((16, 64), 64), ((7, 37), 64), ((3, 256), 128), ((9,), 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_interpreter_dequantize_matches_reference(shape, block_size, dtype):
    mod = _interpreted_kernels()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    packed, absmax = quantize_nf4(x, block_size)
    ref = dequantize_nf4_reference(packed, absmax, shape, block_size, dtype)
    out = mod.dequantize_nf4_triton(packed, absmax, shape, block_size, dtype, bytes_per_program=16)
    assert out.dtype == dtype and torch.equal(out, ref)


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip_keeps_packed_form(double_quant):
    lin = torch.nn.Linear(96, 40, bias=True)
    lin.weight = torch.nn.Parameter(NF4Tensor.from_dense(lin.weight.data.bfloat16(), double_quant=double_quant),
                                    requires_grad=False)
    buf = io.BytesIO()
    torch.save(lin.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)  # weights_only=True: NF4Tensor is registered as a safe global
    assert isinstance(sd["weight"], NF4Tensor) and sd["weight"].double_quant == double_quant
    fresh = torch.nn.Linear(96, 40, bias=True)
    fresh.weight = torch.nn.Parameter(NF4Tensor.from_dense(torch.zeros(40, 96, dtype=torch.bfloat16),
                                                           double_quant=double_quant), requires_grad=False)
    fresh.load_state_dict(sd)
    for a, b in zip(fresh.weight.inner_tensors(), lin.weight.inner_tensors()):
        assert torch.equal(a, b)
    assert fresh.weight.offset == lin.weight.offset
    assert torch.equal(fresh.weight.dequantize(), lin.weight.dequantize())
    # a dense checkpoint loads into an NF4 weight by quantizing it
    dense = torch.randn(40, 96, dtype=torch.bfloat16)
    fresh.load_state_dict({"weight": dense, "bias": torch.zeros(40)})
    assert torch.equal(fresh.weight.dequantize(), NF4Tensor.from_dense(dense, double_quant=double_quant).dequantize())
