"""Fused Triton decode (rANS lanes + sign/mantissa merge in one launch) run under TRITON_INTERPRET=1 at tiny sizes,
bit-exact against the original weights and the CPU path; corrupt streams caught by the end-state check without any
read outside the words; and (GPU) the same on CUDA with no host sync, plus the side-stream prefetch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from memfit.kernels.settings import SETTINGS
from memfit.quant import neuzip_codec as codec
from memfit.quant.neuzip import NeuZipTensor

INTERPRETED = r'''
import torch
from memfit.quant import neuzip_codec as codec
from memfit.kernels.settings import SETTINGS
from memfit.quant.neuzip import NeuZipTensor
from memfit.kernels import ans
from memfit.kernels.ans import gpu as ans_triton
from memfit.kernels.settings import SETTINGS
from tests.quant.test_neuzip import _adversarial

def bits(t):
    return t.view(codec.FORMATS[t.dtype].int_dtype)

for dtype, pre, t32 in [(d, p, t) for d in (torch.bfloat16, torch.float16, torch.float32) for p in (False, True)
                        for t in (False, True)]:
    ans_triton.DECODE_PREFETCH = pre  # the one-step-early sign/mantissa loads
    ans_triton.DECODE_TABLE32 = t32  # 4-byte decode-table entries (tables built from here on)
    adv = _adversarial(dtype)
    finite = adv[~torch.isnan(adv)]
    for k, block, w in ((None, None, adv), (0, None, finite), (1, None, adv), (3, None, adv), (3, 16, finite)):
        w = w[:1001]  # 1001: not a multiple of the lane count nor of 8 (partial bit-packed group)
        z = NeuZipTensor.from_dense(w, k, block=block, symbols_per_lane=37)
        got = z.dequantize(use_triton=True)
        assert z.enc.decode_table().dtype == (torch.int32 if t32 else torch.int64)
        assert torch.equal(bits(got), bits(z.dequantize(use_triton=False))), (dtype, k, block, pre, t32)
        if k is None:
            assert torch.equal(bits(got), bits(w)), dtype
ans_triton.DECODE_PREFETCH = ans_triton.DECODE_TABLE32 = False
# the plain symbol decode through the same kernel, with the cached table, and the end-state check
x = (torch.randn(777, generator=torch.Generator().manual_seed(0)) * 3).round().clamp(-9, 9).add(9).to(torch.uint8)
e = ans.ans_encode(x, lanes=13)
assert torch.equal(ans_triton.decode(e.words, e.lane_offsets, e.final_states, e.n, e.lanes, None, e.freqs, None,
                                     e.prob_bits, table=e.decode_table(), block=16, num_warps=1), x)
# 4-byte entries at the extremes: a one-symbol stream (freq 4096 = 2**12) and a flat 256-symbol one
for y in (torch.full((500,), 3, dtype=torch.uint8), torch.arange(256, dtype=torch.uint8).repeat(3)):
    ey = ans.ans_encode(y, lanes=7)
    t32 = ans_triton.slot_table(ey.freqs, ey.prob_bits, wide=False)
    assert t32.dtype == torch.int32
    assert torch.equal(ans_triton.decode(ey.words, ey.lane_offsets, ey.final_states, ey.n, ey.lanes, None, ey.freqs,
                                         None, ey.prob_bits, table=t32, block=16, num_warps=1), y)
for cut in (1, 40):  # truncated words: lanes over-run their end; the kernel must mask, and the check must fire
    w = e.words[: e.words.numel() - cut].clone()
    o = e.lane_offsets.clamp(max=w.numel())
    try:
        ans_triton.decode(w, o, e.final_states, e.n, e.lanes, None, e.freqs, None, e.prob_bits, block=16, num_warps=1)
        raise SystemExit("truncated stream accepted")
    except ValueError as err:
        assert "does not decode" in str(err)
print("OK")
'''


def test_fused_kernel_interpreter_bit_exact():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(codec.FORMATS[t.dtype].int_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [None, 0, 3])
@pytest.mark.parametrize("prefetch", [False, True])
def test_gpu_fused_dequantize_no_sync(dtype, k, prefetch, monkeypatch):
    from memfit.kernels.ans import gpu as ans_triton

    monkeypatch.setattr(ans_triton, "DECODE_PREFETCH", prefetch)
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(1000, 777, generator=g) * 0.02).to(dtype)
    z = NeuZipTensor.from_dense(w.cuda(), k)
    assert z.enc.table is not None and z.enc.table.is_cuda  # built at compression time, kept on the device
    ref = NeuZipTensor.from_dense(w, k).dequantize()
    z.dequantize()  # compile the kernel outside the no-sync region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside dequantize raises
    try:
        d = z.dequantize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(_bits(d.cpu()), _bits(ref))
    if k is None:
        assert torch.equal(_bits(d.cpu()), _bits(w))


@pytest.mark.gpu
def test_gpu_prefetch_mlp_bit_exact():
    from memfit.quant import neuzip_prefetch as pf

    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [(torch.randn(s, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
          for s in ((512, 256), (512, 256), (256, 512))]
    zs = [NeuZipTensor.from_dense(w) for w in ws]
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)

    def step(a, b, c):
        xi = x.clone().requires_grad_()
        y = F.linear(F.silu(F.linear(xi, a)) * F.linear(xi, b), c)
        y.float().square().sum().backward()
        return y, xi.grad

    y_ref, g_ref = step(*ws)
    pf.PREFETCH.reset()
    was, SETTINGS.neuzip_prefetch = SETTINGS.neuzip_prefetch, True
    try:
        for _ in range(3):  # the first step learns the order; later ones prefetch
            y, gx = step(*zs)
            assert torch.equal(y, y_ref) and torch.equal(gx, g_ref)
    finally:
        SETTINGS.neuzip_prefetch = was
    assert pf.PREFETCH.hits >= 4
