"""Shared fixtures: small, fast configs composed from the real conf/ tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

# One intra-op thread for the whole suite (MEMFIT_TEST_THREADS overrides): the tests' tensors are tiny, and on a
# 2-core machine with other processes running, OpenMP's spinning threads made a 64x64 matmul ~300x slower (20 ms
# against 0.07 ms). Set once here, before any test, so no test depends on another's setting.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("MEMFIT_TEST_THREADS", "1"))  # spawned workers too
torch.set_num_threads(int(os.environ.get("MEMFIT_TEST_THREADS", "1")))

ROOT = Path(__file__).resolve().parent.parent

# a model/run small enough for a few-second CPU job
MODEL_FAST = [
    "model.pretrained=false",
    "model.arch.hidden_size=32",
    "model.arch.intermediate_size=64",
    "model.arch.num_hidden_layers=2",
    "model.arch.num_attention_heads=2",
    "model.arch.num_key_value_heads=1",
]
FAST = [
    *MODEL_FAST,
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "logger=none",
    "callbacks=none",
    "trainer.accelerator=cpu",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "eval.before=false",
    "print_summary=false",
]

TASK_FAST = ["data.n_train=64", "data.n_val=8", "data.n_test=8"]


@pytest.fixture(scope="module")
def cpu_triton():
    """For a test module that runs impl='triton' on CPU tensors: the Triton kernels interpreted for that module only
    (tests/interp.py); on a GPU machine the compiled kernels."""
    import torch

    if torch.cuda.is_available():
        yield
        return
    from interp import interpreter

    with interpreter():
        yield


@pytest.fixture
def fast_cfg(tmp_path):
    """compose(train, FAST + overrides) with outputs and cache under tmp_path."""
    from memfit.config import compose

    def make(*overrides: str):
        task_data = [] if any(o.startswith("data=") for o in overrides) else TASK_FAST
        fast = [o for o in FAST if o not in MODEL_FAST] if any(o.startswith("model=") for o in overrides) else FAST
        return compose("train", [*fast, *task_data, f"paths.output_dir={tmp_path}/out", f"paths.cache_dir={tmp_path}/cache",
                                 *overrides])

    return make
