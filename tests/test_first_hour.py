"""A new user's first hour: documented options work, bad numbers are named at start, a diverging run stops with a
message, every run reports its throughput, the logs and the SLURM dry run behave as documented."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from conftest import ROOT
from memfit.callbacks.guard import NonFiniteLossError
from memfit.callbacks.progress import last_epoch
from memfit.models.tokenizer import char_tokenizer
from memfit.train import run, validate


def test_logger_none_with_the_default_callbacks(fast_cfg):
    """logger=none is documented; the default callbacks include a learning-rate monitor that needs a logger."""
    res = run(fast_cfg("logger=none", "callbacks=default", "~callbacks.progress", "trainer.max_steps=2",
                       "trainer.val_check_interval=2"))
    assert set(res["after"]) >= {"test/acc", "test/loss"}


def test_short_run_reports_tokens_per_second_and_memory(fast_cfg):
    """Two steps (inside the monitor's warm-up, below its logging interval) still give tokens/s and peak memory;
    tokens/s counts exactly the non-padding tokens of the two training batches."""
    cfg = fast_cfg("callbacks=default", "~callbacks.progress", "~callbacks.lr_monitor",
                   "~callbacks.model_checkpoint", "trainer.max_steps=2", "trainer.val_check_interval=2",
                   "trainer.log_every_n_steps=50", "eval.test=false")
    import resource

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB
    res = run(cfg)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    perf = res["perf"]
    dm = instantiate(cfg.data)
    dm.set_tokenizer(char_tokenizer())
    loader = dm.train_dataloader()
    loader.epoch_sampler.set_epoch(0)
    batches = [b for _, b in zip(range(2), loader)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    # on CPU the peak is the process's peak resident set, which the OS reports monotonically: read before and after
    assert rss_before <= perf["peak_mem_gib"] <= rss_after, (rss_before, perf["peak_mem_gib"], rss_after)
    monitor = next(c for c in res["callbacks"] if type(c).__name__ == "ThroughputMonitor")
    assert monitor.warm[0] == tokens
    assert perf["tokens_per_s"] == pytest.approx(tokens / monitor.warm[2], rel=1e-9)


@pytest.mark.parametrize("override,field", [
    ("optim.lr=-1", "optim.lr"), ("optim.lr=0", "optim.lr"), ("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"),
    ("data.batch_size=0", "data.batch_size"), ("trainer.gradient_clip_val=-1.0", "trainer.gradient_clip_val"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"), ("trainer.max_steps=0", "trainer.max_steps"),
])
def test_bad_numbers_are_named_at_start(fast_cfg, override, field):
    with pytest.raises(ValueError, match=rf"^{field.replace('.', '[.]')}=.* is out of range: it must be"):
        validate(fast_cfg(override))


@pytest.mark.parametrize("override", ["adapter.rank=0", "adapter.rank=-4", "adapter.alpha=0"])
def test_adapter_fields_are_named_not_a_layer(fast_cfg, override):
    field = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"^{field.replace('.', '[.]')}="):
        run(fast_cfg("adapter=lora", override))


def test_diverging_run_stops_with_a_message(fast_cfg, tmp_path):
    """optim.lr=1e9 trains to NaN: the run must stop with an error that names the learning rate, not score 0."""
    with pytest.raises(NonFiniteLossError, match=r"train/loss is (nan|inf).*learning rate 1e\+09.*optim\.lr"):
        run(fast_cfg("optim.lr=1e9", "trainer.gradient_clip_val=null", "scheduler=none", "trainer.max_steps=6"))
    assert not (tmp_path / "out" / "model").exists()


def test_saved_adapter_loads_in_peft_onto_the_base(fast_cfg, tmp_path):
    """save_adapter=DIR: peft's PeftModel on the untouched base gives the merged fine-tuned model's logits."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from memfit.models.build import build_model

    cfg = fast_cfg("adapter=lora", "adapter.rank=4", "optim.lr=1e-2", f"save_adapter={tmp_path}/peft",
                   f"save_model={tmp_path}/merged", "trainer.max_steps=3", "eval.test=false")
    run(cfg)
    base, _ = build_model(cfg.model, tmp_path / "cache")
    model = peft.PeftModel.from_pretrained(base.eval(), str(tmp_path / "peft")).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    x = torch.randint(0, merged.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x).logits, merged(x).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    lora_b = [n for n, p in model.named_parameters() if "lora_B" in n and p.abs().max() > 0]
    assert lora_b, "the exported adapter is all zeros: training did not reach it"


def test_save_adapter_without_adapter_fails_at_start(fast_cfg, tmp_path):
    with pytest.raises(ValueError, match="save_adapter=DIR exports a trained adapter"):
        validate(fast_cfg(f"save_adapter={tmp_path}/a"))


@pytest.mark.parametrize("max_epochs,max_steps,batches,accumulate,expected", [
    (-1, 150, 32, 1, 4), (-1, 150, 30, 1, 4), (-1, 150, 31, 1, 4), (-1, 128, 32, 1, 3), (-1, 150, 32, 4, 18),
    (3, 150, 32, 1, 2), (-1, -1, 32, 1, None), (-1, 10, float("inf"), 1, None),
])
def test_progress_bar_last_epoch(max_epochs, max_steps, batches, accumulate, expected):
    """The last epoch index a step-bounded run starts: ceil(steps / (batches // accumulate)) - 1."""
    assert last_epoch(max_epochs, max_steps, batches, accumulate) == expected


def test_train_log_holds_lightning_lines(tmp_path):
    """The run directory's train.log gets Lightning's own lines (they bypassed the root logger before)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "memfit.train", "model.pretrained=false", "model.arch.hidden_size=32",
           "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=1", "model.arch.num_attention_heads=2",
           "model.arch.num_key_value_heads=1", "data.n_train=32", "data.n_val=4", "data.n_test=4", "logger=none",
           "callbacks=none", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.accelerator=cpu",
           "eval.before=false", "eval.test=false", "print_summary=false", "trainer.enable_progress_bar=false",
           f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path}/cache"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    log = (run_dir / "train.log").read_text()
    assert "`Trainer.fit` stopped: `max_steps=2` reached." in log


def test_slurm_dry_run_writes_nothing(tmp_path):
    logs = tmp_path / "logs"
    env = {**os.environ, "MEMFIT_PYTHON": sys.executable, "MEMFIT_LOGS": str(logs)}
    out = subprocess.run(["bash", str(ROOT / "launch.sh"), "--slurm", "--nodes", "1", "--dry-run", "adapter=lora"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("#!/usr/bin/env bash") and "#SBATCH --nodes=1" in out.stdout
    assert f"#SBATCH --output={logs}/%x-%j/slurm-%j.out" in out.stdout
    assert not logs.exists(), "a dry run must not write the batch script (or its folder)"


def test_transfer_help_lists_the_stages():
    out = subprocess.run([sys.executable, "-m", "memfit.transfer", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for stage in ("source_lora", "discriminator", "synthesize", "distill", "evaluate"):
        assert f"\n  {stage} " in out.stdout
    assert "== Configuration groups ==" not in out.stdout  # not Hydra's generic help


def test_run_writes_its_results_json(fast_cfg, tmp_path):
    """results.json in the run directory holds the same scores and counts that run() returns."""
    import json

    res = run(fast_cfg("trainer.max_steps=2", "trainer.val_check_interval=2"))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["after"] == res["after"] and saved["trainable_params"] == res["trainable_params"]
    assert saved["train_loss"] == res["train_loss"]


def test_cpu_runs_use_the_idle_cores(fast_cfg, monkeypatch):
    """cpu_threads=auto: cores minus the other processes' load (closed form under a fixed load average); an explicit
    count is used as given; OMP_NUM_THREADS in the environment decides over auto; GPU runs are left alone."""
    import os

    import memfit.kernels.cpu as cpu
    from memfit.train import set_cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(cpu, "usable_cores", lambda: 8)
        for load, expect in ((0.0, 8), (3.2, 6), (7.9, 1), (40.0, 1)):
            monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
            assert cpu.idle_cores() == expect, load
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "getloadavg", lambda: (4.0, 4.0, 4.0))
        assert set_cpu_threads(fast_cfg("cpu_threads=auto")) == 5 and torch.get_num_threads() == 5
        assert set_cpu_threads(fast_cfg("cpu_threads=3")) == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_cpu_threads(fast_cfg("cpu_threads=auto")) is None
        with pytest.raises(ValueError, match="cpu_threads=0 is not valid"):
            set_cpu_threads(fast_cfg("cpu_threads=0"))
    finally:
        torch.set_num_threads(before)
