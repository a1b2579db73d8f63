"""Shared fixtures: small, fast configs composed from the real conf/ tree."""

from __future__ import annotations

import dataclasses
import os
import sys
import zlib
from pathlib import Path

import lightning  # noqa: F401  (sets PYTORCH_NVML_BASED_CUDA_CHECK on import: once, before any test)
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


# ------------------------------------------------------------------------------------------ process state guard
# The suite runs in random order (pytest-randomly; the header prints `Using --randomly-seed=N`; `--randomly-seed=N`
# replays that order, `-p no:randomly` runs in file order), so no test may leave process-wide state behind. After
# every test (and every module, for module-scoped fixtures) the guard compares the state below with what it was
# before, restores it and fails the test (module) that changed it. A test that needs a change uses monkeypatch or a
# context manager that undoes it.
def pytest_terminal_summary(terminalreporter, config):
    """The order's seed also under -q (which hides pytest-randomly's header line), next to the failures."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None and config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(f"test order: pytest-randomly, replay with --randomly-seed={seed}")


def _kernel_settings() -> dict | None:
    mod = sys.modules.get("memfit.kernels.settings")
    return dataclasses.asdict(mod.SETTINGS) if mod is not None else None


def _kernel_modules() -> dict[str, int]:
    """Identity of every imported memfit.kernels module: an interpreted copy left in place would change it."""
    return {n: id(m) for n, m in sys.modules.items() if n.startswith("memfit.kernels.")}


# set by libraries on first use or on every run, by design: restored after each test like the rest, never a failure
# (pytest's per-phase marker; inductor's cache folder and its tensor-pointer handshake, set on first compile (the
# bitsandbytes peer compiles); Lightning's seed_everything, which every run calls)
LIBRARY_ENV = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",
               "PL_GLOBAL_SEED", "PL_SEED_WORKERS"}


def _snapshot() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LIBRARY_ENV}
    return {"environ": env, "threads": torch.get_num_threads(), "dtype": torch.get_default_dtype(),
            "cwd": os.getcwd(), "grad": torch.is_grad_enabled(), "settings": _kernel_settings(),
            "kernel modules": _kernel_modules()}


def _leaks(before: dict, after: dict) -> list[str]:
    out = []
    env0, env1 = before["environ"], after["environ"]
    for k in sorted(env0.keys() | env1.keys()):
        if env0.get(k) != env1.get(k):
            out.append(f"os.environ[{k!r}]: {env0.get(k)!r} -> {env1.get(k)!r}")
    for key in ("threads", "dtype", "cwd", "grad"):
        if before[key] != after[key]:
            out.append(f"{key}: {before[key]!r} -> {after[key]!r}")
    if before["settings"] is not None and before["settings"] != after["settings"]:
        changed = {k: (v, after["settings"][k]) for k, v in before["settings"].items() if after["settings"][k] != v}
        out.append(f"memfit.kernels.settings.SETTINGS: {changed}")
    swapped = [n for n, i in before["kernel modules"].items() if after["kernel modules"].get(n, i) != i]
    if swapped:
        out.append(f"sys.modules entries replaced: {swapped}")
    return out


def _restore(before: dict) -> None:
    for k in set(os.environ) - set(before["environ"]) - {"PYTEST_CURRENT_TEST"}:
        del os.environ[k]
    os.environ.update(before["environ"])
    torch.set_num_threads(before["threads"])
    torch.set_default_dtype(before["dtype"])
    os.chdir(before["cwd"])
    torch.set_grad_enabled(before["grad"])
    if before["settings"] is not None:
        settings = sys.modules["memfit.kernels.settings"].SETTINGS
        for k, v in before["settings"].items():
            setattr(settings, k, v)


def _guard(what: str):
    before = _snapshot()
    library_env = {k: os.environ.get(k) for k in LIBRARY_ENV - {"PYTEST_CURRENT_TEST"}}
    yield
    after = _snapshot()
    for k, v in library_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    leaks = _leaks(before, after)
    if leaks:
        _restore(before)
        pytest.fail(f"{what} changed process-wide state (restored now): " + "; ".join(leaks), pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def _module_state_guard(request):
    """Module-scoped fixtures must undo what they change, like tests."""
    yield from _guard(f"module {request.module.__name__} (its module-scoped fixtures)")


@pytest.fixture(autouse=True)
def _test_state_guard(request):
    """Fails the test that leaks process state; seeds torch's global generator from the test id, so tests that draw
    from it get the same numbers in any order."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield from _guard("this test")


@pytest.fixture(scope="module")
def cpu_triton():
    """For a test module that runs impl='triton' on CPU tensors: the Triton kernels interpreted for that module only
    (tests/helpers/interp.py); on a GPU machine the compiled kernels."""
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
