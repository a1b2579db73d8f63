"""Kernel and codec switches: read from the environment once, settable from the run config, unknown names refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from memfit.kernels.settings import SETTINGS, configure


def test_environment_is_read_once_at_import():
    code = ("from memfit.kernels.settings import SETTINGS as S; import os; os.environ['CCE_AUTOTUNE'] = '1'; "
            "print(S.cce_autotune, S.fast_launch, S.native, S.tune_cache, S.cache_dir)")
    env = {"PATH": "/usr/bin:/bin", "CCE_AUTOTUNE": "0", "MEMFIT_FAST_LAUNCH": "1", "MEMFIT_NO_NATIVE": "1",
           "MEMFIT_TUNE_CACHE": "0", "MEMFIT_CACHE": "/tmp/mf"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert out.stdout.split() == ["False", "True", "False", "0", "/tmp/mf"], out.stderr


def test_run_config_sets_and_unknown_names_fail(fast_cfg, monkeypatch):
    from memfit.train import run

    for f in ("cce_autotune", "native"):
        monkeypatch.setattr(SETTINGS, f, getattr(SETTINGS, f))  # restored after the test
    run(fast_cfg("kernels.cce_autotune=false", "kernels.native=false", "trainer.max_steps=1", "eval.test=false"))
    assert SETTINGS.cce_autotune is False and SETTINGS.native is False
    with pytest.raises(ValueError, match="kernels.cce_autotun is not a setting; choose from: cache_dir, cce_autotune"):
        configure(cce_autotun=True)
    kept = SETTINGS.fast_launch
    assert configure(fast_launch=None).fast_launch is kept  # None leaves a setting as it is
