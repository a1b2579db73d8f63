"""callbacks=fmdelta: checkpoints are FM-Delta against the base, smaller on disk than plain ones by what the codec
saves, and `ckpt_path=` resumes bit-exactly: the weights restored equal the trained ones bit for bit and the subsequent
losses are identical to an uncompressed resume."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
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


def int_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as a same-width integer tensor (so -0.0 != 0.0 and NaN payloads count)."""
    if not t.is_floating_point():
        return t
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# a bf16 model trains in bf16 only under bf16-true precision (32-true casts the module to fp32)
PRECISION = {"float32": "trainer.precision=32-true", "bfloat16": "trainer.precision=bf16-true"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fmdelta_checkpoint_restores_weights_bit_exact(fast_cfg, tmp_path: Path, dtype: str) -> None:
    """The same 4-step run twice, with plain (atomic) checkpoints and with FM-Delta ones. Every tensor read back from
    the FM-Delta .ckpt equals, bit for bit and in the model's dtype, the one in the plain .ckpt on disk (an independent
    writer: torch.save) and the one Lightning handed to the writer; every trained parameter moved away from the base
    (so a restore that returned the base, or shifted any value, fails). The .ckpt on disk is smaller than the plain one."""
    from memfit.callbacks.fmdelta import load_fmdelta_checkpoint
    from memfit.models.build import build_model

    files, captured = {}, {}
    for name, cb in (("plain", "callbacks=default"), ("fmdelta", "callbacks=fmdelta")):
        cfg = fast_cfg(cb, *COMMON, "trainer.max_steps=4", f"model.dtype={dtype}", PRECISION[dtype],
                       "callbacks.fmdelta.optimizer_codec=zstd" if name == "fmdelta" else "seed=0")
        cfg.paths.output_dir = str(tmp_path / name)
        cfg.callbacks.model_checkpoint.filename = "last"
        captured[name] = Capture()
        run(cfg, callbacks=[captured[name]])
        files[name] = tmp_path / name / "checkpoints" / "last.ckpt"
    model, _ = build_model(cfg.model, tmp_path / "cache")
    base = {f"model.{k}": v for k, v in model.state_dict().items()}
    params = {f"model.{k}" for k, _ in model.named_parameters()}
    plain = torch.load(files["plain"], map_location="cpu", weights_only=True)
    assert KEY not in plain
    ckpt = load_fmdelta_checkpoint(files["fmdelta"], base)
    restored = ckpt["state_dict"]
    assert set(restored) == set(base) == set(plain["state_dict"]) == set(captured["fmdelta"].saved["state_dict"])
    want = getattr(torch, dtype)
    for k, ref in plain["state_dict"].items():
        got = restored[k]
        assert got.dtype == ref.dtype and got.shape == ref.shape, k
        if k in params:
            assert got.dtype == want, k
        assert torch.equal(int_view(got), int_view(ref)), k
        assert torch.equal(int_view(got), int_view(captured["fmdelta"].saved["state_dict"][k])), k
        assert torch.equal(int_view(ref), int_view(captured["plain"].saved["state_dict"][k])), k
        moved = not torch.equal(int_view(ref), int_view(base[k]))
        # only parameters move; every weight matrix does (a bf16 norm weight at 1.0 may not: 1 - lr rounds to 1)
        assert moved <= (k in params) and moved >= (k in params and ref.dim() >= 2), k
    assert_bit_equal(ckpt["optimizer_states"], plain["optimizer_states"], "optimizer_states")
    assert_bit_equal(ckpt["optimizer_states"], captured["fmdelta"].saved["optimizer_states"], "optimizer_states")
    # on disk: the FM-Delta file stores less than the plain one's weights (its own weight payload is counted)
    raw = sum(v.numel() * v.element_size() for v in plain["state_dict"].values())
    stored = torch.load(files["fmdelta"], map_location="cpu", weights_only=True)[KEY]["state_dict"].numel()
    assert stored < raw and os.path.getsize(files["fmdelta"]) < os.path.getsize(files["plain"]) - 0.9 * (raw - stored)


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
