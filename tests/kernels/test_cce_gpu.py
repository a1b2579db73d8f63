"""CCE on the GPU at real sizes (`pytest -m gpu`): Triton kernels against fp64, filtering bound, 64-bit offsets.

This is where the GPU's own arithmetic is checked: bf16 operands go to tl.dot as bf16 and bf16/fp16 dC accumulates
through atomics in its own dtype (the CPU interpreter widens bf16 dots and accumulates bf16 dC in fp32, as it cannot do
either). Bounds: `error_bounds` of tests/helpers/cce_common.py, float64 on the same rounded inputs."""

from __future__ import annotations

import pytest
import torch

from cce_common import assert_within, dc_rounded_adds, error_bounds, make_inputs, reference, run_with_grads
from memfit.kernels.cce import auto_filter_eps, linear_cross_entropy

pytestmark = pytest.mark.gpu


def _on(x, dtype):
    return x.to("cuda", dtype) if x is not None else None


@pytest.mark.parametrize("kind", ["peaked", "flat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [{}, {"softcap": 20.0, "bias": True}, {"label_smoothing": 0.1, "z_loss": 1e-4},
                                  {"accum_fp32": True}],
                         ids=["plain", "softcap_bias", "smooth_zloss", "accum_fp32"])
def test_gpu_vs_fp64(kind, dtype, opts):
    n, v, d = 2048, 32000, 512
    e, c, t = make_inputs(n, v, d, kind, seed=7, ignore_every=5)
    t = t.cuda()
    opts = dict(opts)
    accum_fp32 = opts.pop("accum_fp32", False)
    bias = torch.randn(v, generator=torch.Generator().manual_seed(1)) if opts.pop("bias", False) else None
    e, c, bias = _on(e, dtype), _on(c, dtype), _on(bias, dtype)

    def ours(e_, c_, b_):
        return linear_cross_entropy(e_, c_, t, bias=b_, return_lse=True, filter_eps=None, accum_fp32=accum_fp32,
                                    **opts)

    def ref(e_, c_, b_):
        return reference(e_, c_, t, bias=b_, **opts)

    gt = run_with_grads(ref, e.double(), c.double(), _on(bias, torch.float64))
    out = run_with_grads(ours, e, c, bias)
    valid_rows = int((t != -100).sum())
    bounds = error_bounds(e, c, t, bias=bias, gt=gt, **opts,
                          dc_adds=dc_rounded_adds("triton", dtype, "cuda", valid_rows, accum_fp32))
    print(dtype, kind, opts, accum_fp32, assert_within(gt, out, bounds))


def test_gpu_default_filtering_close_to_exact():
    """bf16 with filter_eps='auto' stays within the exact kernel's bound plus the filtering term."""
    e, c, t = make_inputs(4096, 50000, 256, "peaked", seed=3)
    t = t.cuda()
    e, c = _on(e, torch.bfloat16), _on(c, torch.bfloat16)
    gt = run_with_grads(lambda e_, c_, b_: reference(e_, c_, t), e.double(), c.double())
    out = run_with_grads(lambda e_, c_, b_: linear_cross_entropy(e_, c_, t, return_lse=True), e, c)
    bounds = error_bounds(e, c, t, filter_eps=auto_filter_eps(torch.bfloat16), gt=gt,
                          dc_adds=dc_rounded_adds("triton", torch.bfloat16, "cuda", 4096))
    print(assert_within(gt, out, bounds))


def test_gpu_64bit_offsets_match_chunked_torch():
    """V x D > 2^31 elements: C offsets overflow int32 unless computed in 64 bits."""
    v, d, n = 1 << 20, 2304, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    c = (torch.randn(v, d, device="cuda", generator=g, dtype=torch.bfloat16) / d**0.5)
    e = torch.randn(n, d, device="cuda", generator=g, dtype=torch.bfloat16)
    t = torch.randint(v - 1000, v, (n,), device="cuda", generator=g)  # targets at the far end of the vocabulary
    assert v * d > 2**31
    res = {}
    for impl in ("triton", "torch"):
        e_, c_ = e.clone().requires_grad_(), c.clone().requires_grad_()
        loss = linear_cross_entropy(e_, c_, t, impl=impl, filter_eps=None)
        loss.backward()
        res[impl] = (loss.detach(), e_.grad.float(), c_.grad[-1000:].float())
        del e_, c_
    torch.testing.assert_close(res["triton"][0], res["torch"][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(res["triton"][1:], res["torch"][1:]):
        assert float((a - b).norm() / b.norm()) < 1e-2


def test_gpu_compile_and_autocast():
    e, c, t = make_inputs(1024, 32000, 256, "peaked", seed=5, ignore_every=7)
    e, c, t = e.cuda(), c.cuda(), t.cuda()

    def f(e_, c_):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return linear_cross_entropy(e_, c_, t)

    eager = f(e, c)
    compiled = torch.compile(f, fullgraph=True)(e, c)
    eb, cb = e.bfloat16(), c.bfloat16()  # what autocast hands the kernel
    ref = reference(eb.double(), cb.double(), t)[0]
    bound = error_bounds(eb, cb, t)["loss"]
    assert abs(float(eager) - float(ref)) <= float(bound) and torch.equal(eager, compiled)
