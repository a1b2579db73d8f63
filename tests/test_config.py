"""Config tree, launcher script generation, logger selection and packaging checks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from memfit.config import CONF_DIR, compose

GROUPS = ["model", "adapter", "storage", "loss", "data", "optim", "scheduler", "trainer", "callbacks", "logger",
          "experiment"]


def entries(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# groups whose every entry is instantiated from a top-level _target_ (the others are read field by field, or are
# containers of instantiated nodes, or an entry that means "none")
TOP_TARGET = {"storage", "loss", "data", "optim", "trainer"}
NO_TARGET = {("scheduler", "none"), ("logger", "none")}


def targets(node, path: str = "") -> list[tuple[str, str]]:
    """(path, value) of every _target_ in a plain config container, at any depth."""
    out: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            out += [(path, v)] if k == "_target_" else targets(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += targets(v, f"{path}[{i}]")
    return out


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_entry_composes(group):
    """Every entry composes; every _target_ anywhere in the result (callbacks, strategies, ...) names an object that
    Python's import system finds and that is callable; the groups listed above have one at the top for every entry."""
    from hydra.utils import get_object
    from omegaconf import OmegaConf

    assert entries(group), f"conf/{group} is empty"
    for name in entries(group):
        cfg = compose("train", [f"{group}={name}", "paths.output_dir=/tmp/x"])
        assert group == "experiment" or group in cfg
        found = targets(OmegaConf.to_container(cfg, resolve=False))
        assert found, f"{group}={name}: no _target_ at all"
        for path, target in found:
            assert isinstance(target, str) and callable(get_object(target)), (group, name, path, target)
        top = OmegaConf.to_container(cfg[group], resolve=False) if group in cfg and cfg[group] is not None else None
        has_top = isinstance(top, dict) and "_target_" in top
        if group in TOP_TARGET:
            assert has_top, f"{group}={name} has no top-level _target_"
        if (group, name) in NO_TARGET:
            assert not has_top and not (top or {}).get("_target_"), f"{group}={name} should instantiate nothing"


def test_slurm_launcher_config_composes():
    cfg = compose("train", ["hydra/launcher=slurm", "paths.output_dir=/tmp/x"])
    assert cfg.model.name == "tiny"  # the launcher lives under hydra/, the job config is unchanged
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        full = hcompose("train", ["hydra/launcher=slurm", "paths.output_dir=/tmp/x"], return_hydra_config=True)
    assert full.hydra.launcher._target_.endswith("SlurmLauncher")
    assert full.hydra.launcher.timeout_min == 240


def test_default_run_is_the_quickstart():
    cfg = compose("train", ["paths.output_dir=/tmp/x"])
    assert cfg.model.name == "tiny" and cfg.model.pretrained is True
    assert cfg.data.tasks == "boolean_expressions" and cfg.eval.before is True
    assert cfg.trainer.max_steps == 150 and cfg.loss.name == "cce"


def test_enum_field_lists_valid_options():
    from memfit.config import check_choice

    with pytest.raises(ValueError, match="logger.mode='sometimes' is not a valid option; choose one of: auto, online"):
        check_choice("logger.mode", "sometimes", ["auto", "online", "offline", "disabled"])


def test_wandb_goes_offline_without_credentials(tmp_path, monkeypatch):
    from memfit.callbacks.wandb import resolve_mode, wandb_logged_in

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert not wandb_logged_in() and resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online" and resolve_mode("disabled") == "disabled"


def test_wandb_logger_trains_offline(fast_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_SERVICE", raising=False)  # wandb's service process sets it: removed again at the end
    import wandb
    from refs import Reference, check_run

    from memfit.train import run

    ref = Reference()
    try:
        res = run(fast_cfg("logger=wandb", "trainer.max_steps=2", "eval.test=false"), callbacks=[ref])
    finally:
        wandb.teardown()  # stop the service process this run started; the next wandb test starts its own
    check_run(res, ref, steps=2)
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert runs, "an offline wandb run directory was written"


def run_launch(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEMFIT_PYTHON": sys.executable, **(env_extra or {})}
    return subprocess.run(["bash", str(ROOT / "launch.sh"), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=60)


def test_launch_generates_slurm_script():
    out = run_launch("--slurm", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "01:00:00",
                     "--job-name", "unit", "--dry-run", "adapter=none", "data.tasks=[navigate,word_sorting]")
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=01:00:00", "#SBATCH --requeue",
                 "#SBATCH --signal=SIGUSR1@120", "#SBATCH --job-name=unit"):
        assert line in script.splitlines(), line
    srun = [line for line in script.splitlines() if line.startswith("srun ")][0]
    assert f"{sys.executable} -m memfit.train trainer=ddp trainer.accelerator=gpu" in srun
    assert "trainer.devices=4 trainer.num_nodes=2" in script.split("srun ", 1)[1]
    tail = script.split("srun ", 1)[1]
    assert "adapter=none" in tail and r"data.tasks=\[navigate\,word_sorting\]" in tail  # shell-quoted for bash
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_launch_cpu_slurm_script_and_bad_options():
    out = run_launch("--slurm", "--nodes", "1", "--dry-run", "--job-name", "unitcpu")
    assert out.returncode == 0 and "--gpus-per-node" not in out.stdout
    assert "trainer.accelerator=cpu" in out.stdout and "#SBATCH --ntasks-per-node=1" in out.stdout
    bad = run_launch("--slurm", "--nodes", "zero", "--dry-run")
    assert bad.returncode == 2 and "--nodes must be a positive integer" in bad.stderr
    unknown = run_launch("--frobnicate")
    assert unknown.returncode == 2 and "unknown option --frobnicate" in unknown.stderr
