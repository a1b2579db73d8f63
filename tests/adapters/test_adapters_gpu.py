"""PiSSA init on the lent GPU: weights left in CPU memory are initialised on the GPU, layer group by group, and
match a float64 reference truncation; the residual goes back to the CPU in the base dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memfit.adapters.inject import AdapterSpec, inject

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("niter", [None, 6])
def test_gpu_init_of_cpu_weights_matches_float64(niter):
    g = torch.Generator().manual_seed(0)
    m, n, r = 512, 384, 16
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    w = ((u * 0.9 ** torch.arange(n, dtype=torch.float64)) @ v.T).float()
    model = nn.Sequential()
    for i in range(3):
        lin = nn.Linear(n, m, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        model.add_module(f"p{i}", lin)
    layers = inject(model, AdapterSpec(init="pissa", rank=r, alpha=r, targets=["p0", "p1", "p2"], niter=niter,
                                       init_device="cuda", progress=False))
    uu, ss, vh = torch.linalg.svd(w.double(), full_matrices=False)
    trunc = (uu[:, :r] * ss[:r]) @ vh[:r]
    for lay in layers.values():
        assert lay.base_layer.weight.device.type == "cpu" and lay.lora_A.device.type == "cpu"
        delta = lay.delta().double()
        err = float((delta - trunc).norm() / trunc.norm())
        if niter is None:
            assert err < 1e-5
        else:  # same Halko algorithm as torch.svd_lowrank: comparable error on this spectrum
            torch.manual_seed(1)
            uu2, ss2, vv2 = torch.svd_lowrank(w.cuda(), q=r, niter=niter)
            peer = float(((uu2 * ss2) @ vv2.T).double().cpu().sub(trunc).norm() / trunc.norm())
            assert err < 2 * peer + 1e-6
        assert float((lay.base_layer.weight.double() + delta - w.double()).norm() / w.double().norm()) < 1e-6
