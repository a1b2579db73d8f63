"""The app's composition matrix on one GPU: trainer=gpu and trainer=fsdp (1 device), from fp32 and bf16 checkpoints;
tests/helpers/app_matrix.py says what each case asserts. Resumed losses within 5e-3 (relative): the CCE backward and the NF4
split-K kernels accumulate with atomics, so GPU runs are not bit-reproducible."""

from __future__ import annotations

import pytest
import torch
from app_matrix import COMPOSITIONS, run_case

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CASES = [(n, t, d) for t in ("gpu", "fsdp") for d in ("float32", "bfloat16") for n in COMPOSITIONS]


@pytest.mark.parametrize("name,trainer,dtype", CASES, ids=[f"{t}-{d}-{n}" for n, t, d in CASES])
def test_composition_on_gpu(name, trainer, dtype, tmp_path):
    run_case(name, trainer, dtype, tmp_path, resume_tol=5e-3)


def test_nf4_quantized_on_gpu_equals_cpu():
    """storage=nf4 quantizes CPU-held weights on the GPU (single quantization): the codes and scales must be the CPU
    reference's bytes."""
    from memfit.quant.nf4 import NF4Tensor
    from memfit.quant.nf4_apply import quantize_where_fast

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = (torch.randn(256, 192, generator=g) * torch.logspace(-3, 2, 192)).to(dtype)
        for dq in (False, True):
            fast, ref = quantize_where_fast(w, 64, dq), NF4Tensor.from_dense(w, 64, dq)
            assert fast.device.type == "cpu"
            for a, b in zip(fast.inner_tensors(), ref.inner_tensors()):
                assert torch.equal(a, b), (dtype, dq)
