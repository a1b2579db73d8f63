"""The app's composition matrix on CPU (trainer=cpu, and trainer=fsdp over gloo on one rank); tests/helpers/app_matrix.py
says what each case asserts. The same matrix runs on a GPU in tests/test_app_gpu.py."""

from __future__ import annotations

import pytest
from app_matrix import COMPOSITIONS, run_case

CASES = [(n, "cpu", "float32") for n in COMPOSITIONS] + [(n, "fsdp", "float32") for n in COMPOSITIONS] + \
        [(n, "fsdp", "bfloat16") for n in ("lora-dense-torch", "qpissa-nf4-cce", "lora-neuzip-cce")]


@pytest.mark.parametrize("name,trainer,dtype", CASES, ids=[f"{t}-{d}-{n}" for n, t, d in CASES])
def test_composition_trains_evaluates_saves_resumes(name, trainer, dtype, tmp_path):
    run_case(name, trainer, dtype, tmp_path, resume_tol=0.0)  # CPU: resumed losses bit-equal
