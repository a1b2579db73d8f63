"""The app's composition matrix on one GPU: trainer=gpu and trainer=fsdp (1 device), from fp32 and bf16 checkpoints;
tests/app_matrix.py says what each case asserts. Resumed losses within 5e-3 (relative): the CCE backward and the NF4
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
