"""FM-Delta's Triton symbolise/pack and unpack kernels (kernels/fmdelta/gpu.py) under TRITON_INTERPRET=1: the same
symbols, block table and raw-bit words as the torch reference (kernels/fmdelta/reference.py) on adversarial values of every dtype,
bit-exact decode, the symbol histogram, and corrupt payloads rejected; on CUDA (`-m gpu`) at a real size."""

from __future__ import annotations

import pytest
import torch
from test_fmdelta_codec import DTYPES, adversarial, bits

from interp import interpreted
from memfit.kernels.fmdelta import FORMATS
from memfit.kernels.fmdelta import reference as fmdelta_ref


def _check(mod, base: torch.Tensor, ft: torch.Tensor, block: int, context: bool) -> None:
    fmt = FORMATS[base.dtype]
    mask = fmt.exp_mask if context else 0
    b, f = bits(base), bits(ft)
    sym, bw, words, hist = mod.encode(b, f, fmt.exp_shift, mask, block)
    rsym, rbw, rwords = fmdelta_ref.encode(b, f, fmt.exp_shift, mask, block)
    assert torch.equal(sym, rsym) and torch.equal(bw, rbw) and torch.equal(words, rwords)
    assert torch.equal(hist, torch.bincount(rsym, minlength=256))
    out = mod.decode(b, sym, bw, words, fmt.exp_shift, mask, block)
    assert out.dtype == b.dtype and torch.equal(out, f)
    # in place, into a slice of a larger buffer (as the codec does): the slice is written, its neighbours are not
    buf = torch.full((b.numel() + 6,), 7, dtype=b.dtype)
    assert mod.decode(b, sym, bw, words, fmt.exp_shift, mask, block, out=buf[3:-3]).data_ptr() == buf[3:].data_ptr()
    assert torch.equal(buf[3:-3], f) and (buf[:3] == 7).all() and (buf[-3:] == 7).all()
    with pytest.raises(ValueError, match="out= must be"):
        mod.decode(b, sym, bw, words, fmt.exp_shift, mask, block, out=buf[:-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("context", [True, False])
def test_interpreted_kernels_match_reference(dtype, context):
    mod = interpreted("fmdelta/gpu.py")
    base, ft = adversarial(dtype, n=6000)
    _check(mod, base, ft, 2048, context)  # 6000: a partial last raw block
    _check(mod, base[:1], ft[:1], 2048, context)
    _check(mod, base, base.clone(), 4096, context)  # identical: no raw bits at all


def test_interpreted_decode_rejects_corrupt_payloads():
    mod = interpreted("fmdelta/gpu.py")
    base, ft = adversarial(torch.float32, n=5000)
    fmt = FORMATS[torch.float32]
    b, f = bits(base), bits(ft)
    sym, bw, words, _ = mod.encode(b, f, fmt.exp_shift, fmt.exp_mask, 2048)
    bad = sym.clone()
    bad[17] = 2 * 32 + 1
    with pytest.raises(ValueError, match="outside the alphabet"):
        mod.decode(b, bad, bw, words, fmt.exp_shift, fmt.exp_mask, 2048)
    bad = sym.clone()
    bad[1000:1300] = 0  # symbols that no longer account for the raw bits of their block
    for dec in (mod.decode, fmdelta_ref.decode):
        with pytest.raises(ValueError, match="does not match"):
            dec(b, bad, bw, words, fmt.exp_shift, fmt.exp_mask, 2048)
    with pytest.raises(ValueError, match="multiple of"):
        mod.encode(b, f, fmt.exp_shift, fmt.exp_mask, 1000)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernels_match_reference(dtype):
    from memfit.kernels.fmdelta import gpu as fmdelta_gpu

    base, ft = adversarial(dtype, n=6000)
    g = torch.Generator().manual_seed(5)
    big = torch.randn(3 << 20, generator=g).to(dtype)
    big_ft = (big.double() + 1e-4 * torch.randn(3 << 20, generator=g, dtype=torch.float64)).to(dtype)
    for b0, f0 in ((base, ft), (big, big_ft)):
        fmt = FORMATS[dtype]
        b, f = bits(b0), bits(f0)
        ref = fmdelta_ref.encode(b, f, fmt.exp_shift, fmt.exp_mask, 1 << 16)
        sym, bw, words, hist = fmdelta_gpu.encode(b.cuda(), f.cuda(), fmt.exp_shift, fmt.exp_mask, 1 << 16)
        assert all(torch.equal(x.cpu(), r) for x, r in zip((sym, bw, words), ref))
        assert torch.equal(hist.cpu(), torch.bincount(ref[0], minlength=256))
        out = fmdelta_gpu.decode(b.cuda(), sym, bw, words, fmt.exp_shift, fmt.exp_mask, 1 << 16)
        assert torch.equal(out.cpu(), f)
