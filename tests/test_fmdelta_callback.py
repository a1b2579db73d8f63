"""callbacks=fmdelta: checkpoints are FM-Delta against the base, and `ckpt_path=` resumes bit-exactly: the weights
restored equal those of an uncompressed checkpoint and the subsequent losses are identical to an uncompressed resume."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from memfit.callbacks.fmdelta import KEY
from memfit.train import run

COMMON = ["logger=csv", "trainer.max_steps=8", "trainer.val_check_interval=4", "~callbacks.progress",
          "~callbacks.lr_monitor", "callbacks.model_checkpoint.save_top_k=-1", "eval.test=false",
          "callbacks.model_checkpoint.save_last=false"]


def losses(out_dir: Path) -> dict[int, str]:
    """train/loss per step, as the exact strings the CSV logger wrote."""
    rows = {}
    for f in out_dir.rglob("metrics.csv"):
        for r in csv.DictReader(open(f)):
            if r.get("train/loss"):
                rows[int(r["step"])] = r["train/loss"]
    return rows


def test_resume_from_fmdelta_equals_uncompressed_resume(fast_cfg, tmp_path: Path) -> None:
    runs = {}
    for name, cb in (("plain", "callbacks=default"), ("fmdelta", "callbacks=fmdelta")):
        cfg = fast_cfg(cb, *COMMON)
        cfg.paths.output_dir = str(tmp_path / name)
        cfg.callbacks.model_checkpoint.filename = "step{step:03d}"
        run(cfg)
        runs[name] = sorted((tmp_path / name / "checkpoints").glob("step004*.ckpt"))[0]
    plain = torch.load(runs["plain"], map_location="cpu", weights_only=True)
    packed = torch.load(runs["fmdelta"], map_location="cpu", weights_only=True)
    assert KEY in packed and "state_dict" not in packed and KEY not in plain
    assert len(packed[KEY]["state_dict"]) < 0.9 * sum(v.numel() * v.element_size() for v in plain["state_dict"].values())

    resumed = {}
    for name, cb in (("plain", "callbacks=default"), ("fmdelta", "callbacks=fmdelta")):
        cfg = fast_cfg(cb, *COMMON, f"ckpt_path={runs[name]}")
        cfg.paths.output_dir = str(tmp_path / f"{name}_resumed")
        run(cfg)
        resumed[name] = losses(tmp_path / f"{name}_resumed")
    assert sorted(resumed["plain"]) == [5, 6, 7, 8] or sorted(resumed["plain"]) == [4, 5, 6, 7]
    assert resumed["fmdelta"] == resumed["plain"]  # identical losses, compared as the logged strings
    full = losses(tmp_path / "plain")
    assert all(full[s] == v for s, v in resumed["plain"].items())  # and both equal the uninterrupted run


def test_fmdelta_checkpoint_restores_weights_bit_exact(fast_cfg, tmp_path: Path) -> None:
    from memfit.callbacks.fmdelta import load_fmdelta_checkpoint
    from memfit.models.build import build_model

    cfg = fast_cfg("callbacks=fmdelta", *COMMON, "trainer.max_steps=4", "callbacks.fmdelta.optimizer_codec=zlib")
    cfg.paths.output_dir = str(tmp_path / "run")
    cfg.callbacks.model_checkpoint.filename = "last"
    run(cfg)
    ckpt_file = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    model, _ = build_model(cfg.model, tmp_path / "cache")
    base = {f"model.{k}": v for k, v in model.state_dict().items()}
    ckpt = load_fmdelta_checkpoint(ckpt_file, base)
    assert set(ckpt["state_dict"]) == set(base)
    moved = sum(not torch.equal(ckpt["state_dict"][k], base[k]) for k in base)
    assert moved > len(base) // 2  # training changed most tensors; the delta restored them
    assert isinstance(ckpt["optimizer_states"], list) and ckpt["optimizer_states"][0]["state"]
