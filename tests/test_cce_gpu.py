"""CCE on the GPU at real sizes (`pytest -m gpu`): Triton kernels against fp64, filtering bound, 64-bit offsets."""

from __future__ import annotations

import pytest
import torch

from cce_common import assert_close_to_gt, make_inputs, reference, run_with_grads
from memfit.kernels.cce import linear_cross_entropy

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _on(x, dtype):
    return x.to("cuda", dtype) if x is not None else None


@pytest.mark.parametrize("kind", ["peaked", "flat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [{}, {"softcap": 20.0, "bias": True}, {"label_smoothing": 0.1, "z_loss": 1e-4}],
                         ids=["plain", "softcap_bias", "smooth_zloss"])
def test_gpu_vs_fp64(kind, dtype, opts):
    n, v, d = 2048, 32000, 512
    e, c, t = make_inputs(n, v, d, kind, seed=7, ignore_every=5)
    t = t.cuda()
    opts = dict(opts)
    bias = torch.randn(v, generator=torch.Generator().manual_seed(1)) if opts.pop("bias", False) else None

    def ours(e_, c_, b_):
        return linear_cross_entropy(e_, c_, t, bias=b_, return_lse=True, filter_eps=None, **opts)

    def ref(e_, c_, b_):
        return reference(e_, c_, t, bias=b_, **opts)

    gt = run_with_grads(ref, _on(e, torch.float64), _on(c, torch.float64), _on(bias, torch.float64))
    rs = run_with_grads(ref, _on(e, dtype), _on(c, dtype), _on(bias, dtype))
    out = run_with_grads(ours, _on(e, dtype), _on(c, dtype), _on(bias, dtype))
    assert_close_to_gt(gt, out, rs, TOL[dtype])


def test_gpu_default_filtering_close_to_exact():
    """bf16 with filter_eps='auto' stays within the same bound as the exact kernel on peaked inputs."""
    e, c, t = make_inputs(4096, 50000, 256, "peaked", seed=3)
    t = t.cuda()
    gt = run_with_grads(lambda e_, c_, b_: reference(e_, c_, t), _on(e, torch.float64), _on(c, torch.float64))
    rs = run_with_grads(lambda e_, c_, b_: reference(e_, c_, t), _on(e, torch.bfloat16), _on(c, torch.bfloat16))
    out = run_with_grads(lambda e_, c_, b_: linear_cross_entropy(e_, c_, t, return_lse=True),
                         _on(e, torch.bfloat16), _on(c, torch.bfloat16))
    assert_close_to_gt(gt, out, rs, TOL[torch.bfloat16])


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
    ref = reference(e.double(), c.double(), t)[0]
    assert abs(float(eager) - float(ref)) < 2e-2 * abs(float(ref)) and torch.equal(eager, compiled)
