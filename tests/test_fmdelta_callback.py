"""callbacks=fmdelta: checkpoints are FM-Delta against the base, smaller on disk than plain ones by what the codec
saves, and `ckpt_path=` resumes bit-exactly: the weights restored equal the trained ones bit for bit and the subsequent
losses are identical to an uncompressed resume."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning as L
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


class Capture(L.Callback):
    """The checkpoint dict Lightning hands to the CheckpointIO (before FM-Delta encodes it): the trained state."""

    def __init__(self) -> None:
        self.saved: dict[str, Any] = {}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.saved = {"state_dict": {k: v.detach().clone() for k, v in checkpoint["state_dict"].items()},
                      "optimizer_states": torch.utils._pytree.tree_map(
                          lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x,
                          checkpoint["optimizer_states"])}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_equal(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts/lists of tensors equal bit for bit (NaN payloads and -0.0 included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(bits(a), bits(b)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            assert_bit_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bit_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


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
    # on disk: the .ckpt is smaller than the plain one by at least 90% of what the codec saved on the weights
    raw = sum(v.numel() * v.element_size() for v in plain["state_dict"].values())
    blob = packed[KEY]["state_dict"]
    saving = raw - (blob.numel() if isinstance(blob, torch.Tensor) else len(blob))
    assert saving > 0.1 * raw  # the codec does save something on this fine-tune
    assert os.path.getsize(runs["fmdelta"]) <= os.path.getsize(runs["plain"]) - 0.9 * saving

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
    """The weights and (zstd-coded) optimizer state read back from the .ckpt equal, bit for bit, those Lightning
    handed to the checkpoint writer; training moved most tensors away from the base (so the delta is not trivial)."""
    from memfit.callbacks.fmdelta import load_fmdelta_checkpoint
    from memfit.models.build import build_model

    cfg = fast_cfg("callbacks=fmdelta", *COMMON, "trainer.max_steps=4", "callbacks.fmdelta.optimizer_codec=zstd")
    cfg.paths.output_dir = str(tmp_path / "run")
    cfg.callbacks.model_checkpoint.filename = "last"
    capture = Capture()
    run(cfg, callbacks=[capture])
    ckpt_file = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    model, _ = build_model(cfg.model, tmp_path / "cache")
    base = {f"model.{k}": v for k, v in model.state_dict().items()}
    ckpt = load_fmdelta_checkpoint(ckpt_file, base)
    trained = capture.saved["state_dict"]
    assert set(ckpt["state_dict"]) == set(base) == set(trained)
    assert_bit_equal(ckpt["state_dict"], trained, "state_dict")
    assert_bit_equal(ckpt["optimizer_states"], capture.saved["optimizer_states"], "optimizer_states")
    moved = sum(not torch.equal(trained[k], base[k]) for k in base)
    assert moved > len(base) // 2


def test_plain_checkpoints_written_atomically(tmp_path: Path, monkeypatch) -> None:
    """AtomicCheckpoints swaps Lightning's default writer for AtomicCheckpointIO: a save that fails midway leaves
    neither a file at the checkpoint's path nor a temporary one, and keeps the previous checkpoint intact."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from memfit.callbacks.fmdelta import AtomicCheckpointIO, AtomicCheckpoints

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    AtomicCheckpoints().setup(trainer, None, "fit")
    io = trainer.strategy.checkpoint_io
    assert type(io) is AtomicCheckpointIO
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"w": torch.arange(5)}, path)
    first = path.read_bytes()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5))
    real_save = torch.save

    def failing(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing)
    try:
        io.save_checkpoint({"w": torch.arange(7)}, path)
        raise AssertionError("the failed save did not raise")
    except OSError as e:
        assert str(path) in str(e) and ".partial" not in str(e)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"] and path.read_bytes() == first
