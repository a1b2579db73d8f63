"""PiSSA / QPiSSA / LoftQ inits against the peer implementations: peft's `init_lora_weights="pissa"` and
`"pissa_niter_4"`, peft's PiSSA residual quantized by bitsandbytes (the QPiSSA recipe with one iteration), and peft's
`loftq_init` (CUDA only: peft runs it on a GPU).

What is compared: the adapter product s*B@A and the residual base W - s*B@A, which are unique given the top-r singular
subspace (the factors themselves are only defined up to signs). The test matrix has a spectral gap at rank r
(s_r / s_(r+1) = 10), so the subspace is well conditioned: two fp32 SVDs agree on the product to
~ eps32 * |W| / gap ~ 1e-7 * 2 / 0.9; we allow 2e-5 of max|W|. The randomized variants (4 power iterations) converge
like (s_(r+1)/s_r)^(2*4+1) = 1e-9 on such a gap, so they meet the same bound.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from memfit.adapters import AdapterSpec, nf4_quantizer  # noqa: E402
from memfit.adapters.inject import inject  # noqa: E402
from memfit.kernels.nf4 import unpack_nibbles  # noqa: E402

R, ALPHA = 6, 12.0
TOL = 2e-5


def gapped(m: int, n: int, seed: int) -> torch.Tensor:
    """W = U diag(s) V^T with s = (2, 1.9, ..., 1.5, then 0.15 * 0.9^k): a gap of 10x after rank R."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    k = torch.arange(min(m, n), dtype=torch.float64)
    s = torch.where(k < R, 2.0 - 0.1 * k, 0.15 * 0.9 ** (k - R))
    return ((u * s) @ v.T).float()


def model_with(w: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    m = nn.Sequential()
    m.add_module("proj", lin)
    return m


def peft_pissa(w: torch.Tensor, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(s*B@A, residual) from peft's own PiSSA init of a Linear holding w."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(model_with(w), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"],
                                                  init_lora_weights=init))
    lay = pm.base_model.model.proj
    s = lay.scaling["default"]
    assert s == ALPHA / R
    delta = s * lay.lora_B["default"].weight.double() @ lay.lora_A["default"].weight.double()
    return delta, lay.base_layer.weight.detach().double()


def ours(w: torch.Tensor, niter: int | None, quantizer=None, init: str = "pissa", iters: int = 1) -> nn.Module:
    m = model_with(w)
    spec = AdapterSpec(init=init, rank=R, alpha=ALPHA, targets=["proj"], niter=niter, iters=iters, progress=False)
    inject(m, spec, quantizer)
    return m.proj


@pytest.mark.parametrize(("init", "niter"), [("pissa", None), ("pissa_niter_4", 4)])
def test_pissa_equals_peft(init, niter):
    w = gapped(48, 40, seed=1)
    ref_delta, ref_base = peft_pissa(w, init)
    lay = ours(w, niter)
    scale = float(w.abs().max())
    assert (lay.delta().double() - ref_delta).abs().max() <= TOL * scale
    assert (lay.base_layer.weight.double() - ref_base).abs().max() <= TOL * scale
    # both are the float64 rank-R truncation (the gap makes it unique)
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    trunc = (u[:, :R] * sv[:R]) @ vh[:R]
    assert (lay.delta().double() - trunc).abs().max() <= TOL * scale


def test_qpissa_one_iteration_equals_peft_pissa_then_bitsandbytes():
    """The QPiSSA recipe with T=1 is "PiSSA, then quantize the residual" (peft's PiSSA + bitsandbytes' NF4 in the
    QPiSSA paper's script). The adapters match peft's as above; the stored NF4 base is bitsandbytes' quantization of
    peft's residual except where the two fp32 residuals (which differ by < TOL * max|W|) straddle an NF4 decision
    midpoint: there the code may differ by one, and only for values within that distance of a midpoint."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    from memfit.kernels.nf4 import nf4_midpoints

    w = gapped(64, 64, seed=2)
    ref_delta, ref_base = peft_pissa(w, "pissa")
    lay = ours(w, None, nf4_quantizer({"name": "nf4", "block_size": 64, "double_quant": False}), iters=1)
    scale = float(w.abs().max())
    assert (lay.delta().double() - ref_delta).abs().max() <= TOL * scale
    # the adapter layer holds the dense residual; the storage step (storage=nf4) quantizes it with this NF4
    from memfit.quant import NF4Tensor

    assert type(lay.base_layer.weight) is nn.Parameter and lay.base_layer.weight.dtype == torch.float32

    stored = NF4Tensor.from_dense(lay.base_layer.weight.detach().float().contiguous(), 64)
    packed, st = bnb_f.quantize_4bit(ref_base.float().contiguous(), blocksize=64, quant_type="nf4")
    ours_codes = unpack_nibbles(stored.packed).long()
    ref_codes = unpack_nibbles(packed.reshape(-1)).long()
    differ = ours_codes != ref_codes
    assert torch.all((ours_codes - ref_codes)[differ].abs() == 1)
    # where they differ, peft's residual / absmax lies within the residual difference of a decision midpoint
    x = (ref_base.reshape(-1) / st.absmax.double().repeat_interleave(64)).float()
    dist = (x[:, None].double() - nf4_midpoints().double()[None, :]).abs().min(1).values
    assert torch.all(dist[differ] <= 2 * TOL * scale / st.absmax.min())
    assert differ.float().mean() <= 0.01
    assert torch.allclose(stored.absmax, st.absmax, rtol=4 * TOL, atol=0)


@pytest.mark.gpu
def test_loftq_equals_peft_loftq_init():
    """peft.utils.loftq_utils.loftq_init (bitsandbytes NF4 on the GPU, exact SVD, no scaling: alpha = r) against our
    LoftQ on the same weight: the dequantized base and the adapter product agree within the NF4 code flips that
    fp32 differences can cause (a few elements, each by one code step: NF4's widest step is 1 - 0.7230 < 0.28 of the
block's absmax, and max|deq| is the largest absmax)."""
    from peft.utils.loftq_utils import loftq_init

    w = gapped(64, 64, seed=3)
    deq, lora_a, lora_b = loftq_init(w.cuda(), num_bits=4, reduced_rank=R, num_iter=3)
    m = model_with(w)
    inject(m, AdapterSpec(init="loftq", rank=R, alpha=R, targets=["proj"], iters=3, progress=False),
           nf4_quantizer({"name": "nf4", "block_size": 64, "double_quant": False}))
    lay = m.proj
    from memfit.quant import NF4Tensor

    ours_deq = NF4Tensor.from_dense(lay.base_layer.weight.detach().float().contiguous(), 64).dequantize().double()
    ref_deq = deq.double().cpu()
    flips = (ours_deq - ref_deq).abs() > 1e-6
    assert flips.float().mean() <= 0.01
    assert (ours_deq - ref_deq).abs().max() <= 0.28 * float(ref_deq.abs().max())
    ref_delta = lora_b.double().cpu() @ lora_a.double().cpu()
    # the low-rank fit of W - deq: equal up to the flipped elements' effect on the rank-R projection
    assert (lay.delta().double() - ref_delta).norm() <= 1e-4 * float(w.norm()) + (ours_deq - ref_deq).norm()
