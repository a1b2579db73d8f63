"""NF4 quantizer and NF4Tensor: known-answer bytes (codes picked by hand from the bitsandbytes table, nibbles packed
high first), block-size and checkpoint-entry checks, packed sizes in closed form, the matmul paths against float64
dense products, and the FSDP2 post-all-gather paths. Written to kill the mutants experiments/mutation.py found
surviving."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from memfit.kernels import nf4 as k
from memfit.quant.nf4 import NF4Tensor, _rebuild_nf4, nf4_linear, nf4_mm, nf4_num_blocks

SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def test_nibble_packing_known_bytes():
    assert k.pack_nibbles(torch.tensor([1, 2, 15, 0, 7, 8], dtype=torch.uint8)).tolist() == [0x12, 0xF0, 0x78]
    assert k.unpack_nibbles(torch.tensor([0xAB, 0x0F, 0xF0], dtype=torch.uint8)).tolist() == [10, 11, 0, 15, 15, 0]
    assert k.unpack_nibbles(torch.tensor([[0x12], [0x34]], dtype=torch.uint8)).tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="even"):
        k.pack_nibbles(torch.tensor([1, 2, 3], dtype=torch.uint8))


def test_block_sizes():
    for b in SIZES:
        k.check_block_size(b)
    for b in (16, 33, 100, 129, 1025, 8192, 0):
        with pytest.raises(ValueError, match="block_size"):
            k.check_block_size(b)
    assert [nf4_num_blocks(n, 64) for n in (1, 64, 65, 128, 129)] == [1, 1, 2, 2, 3]
    assert k.num_blocks(4096, 4096) == 1


def test_quantize_known_bytes_and_padding():
    # absmax 2: scaled values 0.5, -1, 0.25, 1, 0 -> codes 12 (0.5 < midpoint 0.5017 of codes 12/13), 0, 10, 15, 7
    x = torch.tensor([1.0, -2.0, 0.5, 2.0, 0.0])
    packed, absmax = k.quantize_nf4(x, 32)
    assert absmax.tolist() == [2.0]
    assert packed.tolist() == [0xC0, 0xAF, 0x77]  # the odd length's pad nibble is the code of 0 (7)
    # two blocks: the second one (partial) has its own absmax; padding never shows
    y = torch.cat([torch.full((32,), 0.25), torch.tensor([-4.0, 1.0])])
    packed, absmax = k.quantize_nf4(y, 32)
    assert absmax.tolist() == [0.25, 4.0]
    assert packed.tolist() == [0xFF] * 16 + [0x0A]  # 1.0 -> 15; -1 -> 0, 0.25 -> 10
    deq = k.dequantize_nf4(packed, absmax, (34,), 32, torch.float32)
    assert deq[:32].tolist() == [0.25] * 32 and deq[32:].tolist() == [-4.0, 4.0 * k.NF4_CODE[10]]
    with pytest.raises(ValueError, match="empty"):
        k.quantize_nf4(torch.empty(0), 64)
    with pytest.raises(TypeError, match="floating-point"):
        k.quantize_nf4(torch.ones(4, dtype=torch.int32), 64)


def test_code_pairs_and_cache():
    pairs = k.nf4_code_pairs()
    code = torch.tensor(k.NF4_CODE, dtype=torch.float32)
    for b in (0x00, 0x0F, 0xF0, 0x7A, 0xFF):
        lo, hi = int(pairs[b]) & 0xFFFFFFFF, (int(pairs[b]) >> 32) & 0xFFFFFFFF
        assert torch.tensor([lo], dtype=torch.int64).to(torch.int32).view(torch.float32).item() == code[b >> 4]
        assert torch.tensor([hi], dtype=torch.int64).to(torch.int32).view(torch.float32).item() == code[b & 15]
    assert k.nf4_code() is k.nf4_code("cpu") and k.nf4_midpoints() is k.nf4_midpoints()


def _w(shape=(6, 64), seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_tensor_construction_and_sizes():
    w = _w((5, 20))
    t = NF4Tensor.from_dense(w, 64)
    assert not t.double_quant and t.scale_tensors() == (t.absmax,) and len(t.inner_tensors()) == 2
    assert t.packed_nbytes() == 50 + 2 * 4  # 100 codes in 50 bytes, 2 fp32 scales
    dq = NF4Tensor.from_dense(w, 64, double_quant=True)
    assert dq.double_quant and len(dq.scale_tensors()) == 2 and len(dq.inner_tensors()) == 3
    assert dq.packed_nbytes() == 50 + 2 * 1 + 1 * 4  # uint8 scales + one fp32 second-level scale
    assert "double_quant=True" in repr(dq) and "double_quant" not in repr(t)
    with pytest.raises(TypeError, match="already quantized"):
        NF4Tensor.from_dense(t)
    for bad in (torch.ones(4, dtype=torch.int64), [1.0, 2.0]):
        with pytest.raises(TypeError, match="floating-point"):
            NF4Tensor.from_dense(bad)
    with pytest.raises(ValueError, match="block_size"):
        NF4Tensor.from_dense(w, 48)
    other = t.with_inner(t.packed, t.scale_tensors(), dtype=torch.bfloat16)
    assert other.dtype == torch.bfloat16 and other.shape == w.shape and other.block_size == 64
    assert t.with_inner(t.packed, t.scale_tensors()).dtype == torch.float32
    flat = t.with_inner(t.packed, t.scale_tensors(), shape=torch.Size([100]))
    assert flat.shape == (100,) and torch.equal(flat.dequantize(), t.dequantize().reshape(-1))
    assert t.dequantize(torch.float64).dtype == torch.float64
    assert torch.equal(t.dequantize(torch.bfloat16), t.dequantize().to(torch.bfloat16))


def test_matmul_paths_against_float64():
    w = _w((6, 64), 1)
    t = NF4Tensor.from_dense(w, 64)
    d = t.dequantize().double()
    a = _w((3, 64), 2)
    torch.testing.assert_close(nf4_mm(a, t).double(), a.double() @ d.T, atol=1e-5, rtol=1e-5)
    g = _w((2, 4, 6), 3)
    out = nf4_mm(g, t, trans=True)
    assert out.shape == (2, 4, 64)
    torch.testing.assert_close(out.double(), g.double() @ d, atol=1e-5, rtol=1e-5)
    b = _w((6,), 4)
    torch.testing.assert_close(F.linear(a, t, bias=b).double(), a.double() @ d.T + b.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nf4_linear(a, t, b).double(), a.double() @ d.T + b.double(), atol=1e-5, rtol=1e-5)
    x = a.clone().requires_grad_(True)
    F.linear(x, t).sum().backward()
    torch.testing.assert_close(x.grad.double(), d.sum(0).expand(3, 64), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        y = F.linear(x, t)
    assert not y.requires_grad
    with pytest.raises(ValueError, match="features"):
        F.linear(_w((2, 63)), t)
    trainable = NF4Tensor.from_dense(w, 64).requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        nf4_linear(a, trainable)


def test_fsdp_post_all_gather_paths():
    w = _w((4, 64), 5)
    t = NF4Tensor.from_dense(w, 64)
    inputs, meta = t.fsdp_pre_all_gather(None, w.shape, (64, 1), None, None)
    assert meta == (64, None, torch.Size([4, 64])) and inputs[0] is t.packed
    full, outs = t.fsdp_post_all_gather(inputs, meta, None)
    assert full.dtype == torch.float32 and torch.equal(full.dequantize(), t.dequantize()) and outs == tuple(inputs)
    bf, _ = t.fsdp_post_all_gather(inputs, meta, torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    one, _ = t.fsdp_post_all_gather(inputs[:1], meta, None)  # 1-rank shortcut: this shard's own scales
    assert one.absmax is t.absmax and torch.equal(one.dequantize(), t.dequantize())
    # two shards gathered: the scales come from the outputs
    halves = [NF4Tensor.from_dense(h, 64) for h in w.chunk(2)]
    gathered = (torch.cat([h.packed for h in halves]), torch.cat([h.absmax for h in halves]))
    both, _ = halves[0].fsdp_post_all_gather(gathered, (64, None, torch.Size([4, 64])), None)
    assert torch.equal(both.dequantize(), t.dequantize())
    assert t.fsdp_post_all_gather(inputs, meta, None, out=full) is None
    with pytest.raises(TypeError, match="NF4Tensor"):
        t.fsdp_post_all_gather(inputs, meta, None, out=torch.empty(4, 64))


@pytest.mark.parametrize("double_quant", [False, True])
def test_checkpoint_rebuild_checks(double_quant):
    t = NF4Tensor.from_dense(_w((3, 50), 6), 64, double_quant=double_quant)
    buf = io.BytesIO()
    torch.save({"w": t}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)["w"]
    assert isinstance(back, NF4Tensor) and back.double_quant == double_quant
    assert torch.equal(back.dequantize(), t.dequantize())
    inner, off = t.inner_tensors(), t.offset
    assert _rebuild_nf4(inner, (3, 50), "float32", 64, off).shape == (3, 50)
    with pytest.raises(ValueError, match="dtype"):
        _rebuild_nf4(inner, (3, 50), "float64", 64, off)
    with pytest.raises(ValueError, match="block_size"):
        _rebuild_nf4(inner, (3, 50), "float32", 63, off)
    wrong_count = inner[:2] if double_quant else (*inner, inner[1])
    with pytest.raises(ValueError, match="inner tensors"):
        _rebuild_nf4(wrong_count, (3, 50), "float32", 64, off)
    with pytest.raises(ValueError, match="inner tensors"):
        _rebuild_nf4(inner, (3, 50), "float32", 64, None if double_quant else 0.5)
    with pytest.raises(ValueError, match="inner tensors"):
        _rebuild_nf4((inner[0],), (3, 50), "float32", 64, off)
    with pytest.raises(ValueError, match="packed bytes"):
        _rebuild_nf4((inner[0][:-1], *inner[1:]), (3, 50), "float32", 64, off)
    with pytest.raises(ValueError, match="packed bytes"):
        _rebuild_nf4((inner[0].to(torch.int16), *inner[1:]), (3, 50), "float32", 64, off)
    with pytest.raises(ValueError, match="block scales"):
        _rebuild_nf4((inner[0], inner[1][:-1], *inner[2:]), (3, 50), "float32", 64, off)
    odd = NF4Tensor.from_dense(_w((3, 5), 7), 32, double_quant=double_quant)  # 15 weights: 8 bytes, 1 scale
    assert _rebuild_nf4(odd.inner_tensors(), (3, 5), "bfloat16", 32, odd.offset).dtype == torch.bfloat16


@pytest.mark.parametrize("double_quant", [False, True])
def test_subclass_flatten_round_trip(double_quant):
    # the wrapper-subclass protocol (torch.compile, FSDP2): inner tensors by name, then rebuilt from them
    t = NF4Tensor.from_dense(_w((3, 40), 8), 32, double_quant=double_quant)
    names, ctx = t.__tensor_flatten__()
    assert names == (["packed", "qabsmax", "absmax2"] if double_quant else ["packed", "absmax"])
    assert ctx == (32, t.offset, torch.float32)
    back = NF4Tensor.__tensor_unflatten__({n: getattr(t, n) for n in names}, ctx, t.shape, t.stride())
    assert back.double_quant == double_quant and torch.equal(back.dequantize(), t.dequantize())
