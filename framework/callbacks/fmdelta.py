"""Checkpoints of full fine-tuning runs written as FM-Delta against the base model (`callbacks=fmdelta`).

At `setup` (before Lightning restores any `ckpt_path`) the callback snapshots the freshly built model's state dict:
that is the base. It then wraps the strategy's CheckpointIO: on save, the checkpoint's `state_dict` is replaced by an
FM-Delta container against the base, and the optimizer state (Lightning's, and that of weights trained compressed) is
kept as usual or compressed with a generic codec (`optimizer_codec`); on load (resume with `ckpt_path=`) both are
restored bit for bit before Lightning uses them, so a resumed run continues exactly as from an uncompressed
checkpoint. A checkpoint made against another base fails with BaseMismatchError.

Compressed payloads are uint8 tensors, not `bytes`: torch.save writes a tensor's storage raw, while bytes inside the
pickle (protocol 2) cost about 1.5x their size, which used to eat the whole saving. Local checkpoint files are written
atomically (AtomicCheckpointIO): an error, Ctrl-C or SIGTERM never leaves a file that looks complete but is not.
"""

from __future__ import annotations

import io
import lzma
import os
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from memfit.compression.fmdelta_records import state_fingerprint
from memfit.compression.fmdelta_state import load_state_delta, save_state_delta
from memfit.compression.safe_io import AtomicFile
from memfit.config import check_choice

CODECS = ("none", "zlib", "lzma", "zstd")
KEY = "fmdelta"
# optimizer state the generic codec covers: Lightning's, and the in-backward optimizer's of weights trained compressed
# (storage.train_compressed: its momentum / Adam moments live under the LightningModule's own key)
OPTIMIZER_KEYS = ("optimizer_states", "optimizer_states_in_backward", "neuzip_optimizer")  # the last: older files


def generic_compress(data: bytes, codec: str, level: int | None = None) -> bytes:
    """Compress with a general-purpose codec (the measured alternative for optimizer state)."""
    check_choice("optimizer_codec", codec, CODECS)
    if codec == "zlib":
        return zlib.compress(data, 6 if level is None else level)
    if codec == "lzma":
        return lzma.compress(data, preset=6 if level is None else level)
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3 if level is None else level).compress(data)
    return data


def generic_decompress(data: bytes, codec: str) -> bytes:
    check_choice("optimizer_codec", codec, CODECS)
    if codec == "zlib":
        return zlib.decompress(data)
    if codec == "lzma":
        return lzma.decompress(data)
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompress(data)
    return data


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def as_u8(data: bytes) -> torch.Tensor:
    """Bytes as a uint8 tensor, which torch.save stores as raw storage (bytes in the pickle grow by ~1.5x)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _raw(blob: torch.Tensor | bytes) -> bytes | memoryview:
    """A payload stored by `as_u8` (or as bytes, by the first version of this callback)."""
    if isinstance(blob, torch.Tensor):
        if blob.dtype != torch.uint8 or blob.dim() != 1:
            raise ValueError(f"FM-Delta checkpoint payload is a {blob.dtype} tensor of shape {tuple(blob.shape)}")
        return memoryview(blob.contiguous().numpy())
    if isinstance(blob, bytes | bytearray):
        return blob
    raise ValueError(f"FM-Delta checkpoint payload is a {type(blob).__name__}, not bytes")


def _local(path: Any) -> bool:
    return isinstance(path, str | os.PathLike) and "://" not in str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a hidden temporary file renamed onto the checkpoint (safe_io.AtomicFile), for local paths:
    Lightning's own writer can leave a truncated file at the final path when the copy from its temporary is cut."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with AtomicFile(path) as f:
            torch.save(checkpoint, f)


class AtomicCheckpoints(L.Callback):
    """Plain checkpoints written atomically too: swaps Lightning's default writer for AtomicCheckpointIO at setup
    (strategies with their own writer, e.g. sharded FSDP checkpoints, are left alone)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class FMDeltaCheckpointIO(CheckpointIO):
    """Delegates file I/O to the wrapped CheckpointIO (Lightning's plain writer: atomically, see AtomicCheckpointIO);
    encodes/decodes the model and optimizer state."""

    def __init__(self, inner: CheckpointIO, owner: FMDeltaCheckpoint):
        self.inner, self.owner = inner, owner
        self.writer = AtomicCheckpointIO() if type(inner) is TorchCheckpointIO else inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.writer.save_checkpoint(self.owner.encode(checkpoint), path, storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        return self.owner.decode(self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only))

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


class FMDeltaCheckpoint(L.Callback):
    def __init__(self, context: bool = True, optimizer_codec: str = "none", optimizer_level: int | None = None):
        check_choice("callbacks.fmdelta.optimizer_codec", optimizer_codec, CODECS)
        self.context, self.codec, self.level = context, optimizer_codec, optimizer_level
        self.base: dict[str, torch.Tensor] | None = None
        self.base_fp = ""
        self.sizes: dict[str, int] = {}  # bytes of the last checkpoint's parts (raw vs stored), for measurements

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.base is None:
            self.base = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
            self.base_fp = state_fingerprint(self.base)
        strategy = trainer.strategy
        if not isinstance(strategy.checkpoint_io, FMDeltaCheckpointIO):
            strategy.checkpoint_io = FMDeltaCheckpointIO(strategy.checkpoint_io, self)

    def encode(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        if self.base is None:
            raise RuntimeError("FMDeltaCheckpoint has no base: the callback was not set up by a Trainer")
        ckpt = dict(checkpoint)
        state = ckpt.pop("state_dict")
        buf = io.BytesIO()
        save_state_delta(buf, state, self.base, context=self.context, base_fp=self.base_fp)
        blob: dict[str, Any] = {"version": 2, "state_dict": as_u8(buf.getbuffer()), "base_fingerprint": self.base_fp,
                                "optimizer_codec": self.codec}
        self.sizes = {"state_dict_raw": _tensor_bytes(state), "state_dict_stored": blob["state_dict"].numel()}
        present = [k for k in OPTIMIZER_KEYS if k in ckpt]
        if present:
            self.sizes["optimizer_raw"] = sum(_tensor_bytes(ckpt[k]) for k in present)
            if self.codec != "none":
                for k in present:
                    ob = io.BytesIO()
                    torch.save(ckpt.pop(k), ob)
                    packed = generic_compress(ob.getvalue(), self.codec, self.level)
                    blob[k] = as_u8(packed)
                    blob[f"{k}_crc32"] = zlib.crc32(packed)  # zstd frames carry no checksum by default
                self.sizes["optimizer_stored"] = sum(blob[k].numel() for k in present)
        ckpt[KEY] = blob
        return ckpt

    def decode(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        """Restore `state_dict` (and compressed optimizer state) of an FM-Delta checkpoint; others pass through."""
        blob = ckpt.pop(KEY, None)
        if blob is None:
            return ckpt
        if self.base is None:
            raise RuntimeError("FMDeltaCheckpoint has no base: the callback was not set up by a Trainer")
        if not isinstance(blob, dict) or "state_dict" not in blob:
            raise ValueError(f"FM-Delta checkpoint entry {KEY!r} is malformed ({type(blob).__name__})")
        ckpt["state_dict"] = load_state_delta(io.BytesIO(_raw(blob["state_dict"])), self.base, base_fp=self.base_fp)
        for k in OPTIMIZER_KEYS:
            if k in blob:
                packed = bytes(_raw(blob[k]))
                if f"{k}_crc32" in blob and zlib.crc32(packed) != blob[f"{k}_crc32"]:
                    raise ValueError(f"FM-Delta checkpoint: {k} is corrupt (checksum mismatch)")
                try:
                    raw = generic_decompress(packed, blob.get("optimizer_codec", "none"))
                    ckpt[k] = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
                except ValueError:
                    raise
                except Exception as e:  # zlib/lzma/zstd and unpickling errors of a corrupt file: a clear ValueError
                    raise ValueError(f"FM-Delta checkpoint: {k} is corrupt ({type(e).__name__}: {e})") from None
        return ckpt


def load_fmdelta_checkpoint(path: str | Path, base: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A Lightning checkpoint written with FMDeltaCheckpoint, decoded against `base` (outside a Trainer)."""
    cb = FMDeltaCheckpoint()
    cb.base, cb.base_fp = base, state_fingerprint(base)
    return cb.decode(torch.load(path, map_location="cpu", weights_only=True))
