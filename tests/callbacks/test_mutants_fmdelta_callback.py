"""FM-Delta checkpoint callback without a Trainer: encode/decode of checkpoint dicts, the optimizer-state codecs against
the codec libraries themselves, the size accounting in closed form, and the payload/checksum checks. Written to kill
the mutants experiments/mutation.py found surviving."""

from __future__ import annotations

import io
import lzma
import types
import zlib

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from memfit.callbacks import fmdelta as cb
from memfit.compression.fmdelta_records import state_fingerprint


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
            "steps": torch.tensor(3)}


def _callback(codec: str = "none", level: int | None = None) -> cb.FMDeltaCheckpoint:
    c = cb.FMDeltaCheckpoint(optimizer_codec=codec, optimizer_level=level)
    c.base = _state(0)
    c.base_fp = state_fingerprint(c.base)
    return c


def _tuned() -> dict[str, torch.Tensor]:
    s = _state(0)
    return {"w": s["w"] + 1e-3, "b": s["b"], "steps": torch.tensor(5)}


OPT = {"state": {0: {"exp_avg": torch.arange(12, dtype=torch.float32).reshape(3, 4)}}, "param_groups": [{"lr": 0.1}]}


@pytest.mark.parametrize("codec", ["none", "zlib", "lzma"])
def test_encode_decode_round_trip_and_sizes(codec):
    c = _callback(codec)
    ckpt = {"state_dict": _tuned(), "optimizer_states": [OPT], "epoch": 2}
    out = c.encode(ckpt)
    assert "state_dict" not in out and out["epoch"] == 2 and "state_dict" in ckpt  # the input dict is not changed
    blob = out[cb.KEY]
    assert blob["version"] == 2 and blob["base_fingerprint"] == c.base_fp and blob["optimizer_codec"] == codec
    assert blob["state_dict"].dtype == torch.uint8 and blob["state_dict"].dim() == 1
    # raw size in closed form: 30 fp32 + 5 bf16 + one int64
    assert c.sizes["state_dict_raw"] == 30 * 4 + 5 * 2 + 8
    assert c.sizes["state_dict_stored"] == blob["state_dict"].numel()
    assert c.sizes["optimizer_raw"] == 12 * 4
    if codec == "none":
        assert out["optimizer_states"] is ckpt["optimizer_states"] and "optimizer_stored" not in c.sizes
    else:
        packed = bytes(blob["optimizer_states"].numpy())
        assert blob["optimizer_states_crc32"] == zlib.crc32(packed)
        raw = zlib.decompress(packed) if codec == "zlib" else lzma.decompress(packed)
        restored = torch.load(io.BytesIO(raw), weights_only=True)
        assert torch.equal(restored[0]["state"][0]["exp_avg"], OPT["state"][0]["exp_avg"])
        assert c.sizes["optimizer_stored"] == len(packed)
        assert "optimizer_states" not in out
    back = _callback(codec).decode(out)
    for k, v in _tuned().items():
        assert torch.equal(back["state_dict"][k].view(-1).view(torch.uint8), v.view(-1).view(torch.uint8))
    assert torch.equal(back["optimizer_states"][0]["state"][0]["exp_avg"], OPT["state"][0]["exp_avg"])
    assert cb.KEY not in back


def test_no_optimizer_state_records_no_optimizer_sizes():
    c = _callback("zlib")
    c.encode({"state_dict": _tuned()})
    assert set(c.sizes) == {"state_dict_raw", "state_dict_stored"}


def test_generic_codecs_match_the_libraries():
    data = bytes(range(256)) * 40
    assert cb.generic_compress(data, "zlib") == zlib.compress(data, 6)
    assert cb.generic_compress(data, "zlib", 1) == zlib.compress(data, 1)
    assert cb.generic_compress(data, "lzma") == lzma.compress(data, preset=6)
    assert cb.generic_compress(data, "lzma", 0) == lzma.compress(data, preset=0)
    assert cb.generic_compress(data, "none") == data
    for codec in ("zlib", "lzma", "none"):
        assert cb.generic_decompress(cb.generic_compress(data, codec), codec) == data
    assert cb.generic_decompress(zlib.compress(data), "zlib") == data
    assert cb.generic_decompress(lzma.compress(data), "lzma") == data
    with pytest.raises(ValueError):
        cb.generic_compress(data, "gzip")
    with pytest.raises(ValueError):
        cb.generic_decompress(data, "gzip")


def test_zstd_codec_when_installed():
    import random

    zstandard = pytest.importorskip("zstandard")
    r = random.Random(0)  # word-like text: levels 3 and 4 give different frames (a periodic input does not)
    words = [bytes(r.choice(b"abcdefghij") for _ in range(r.randint(2, 8))) for _ in range(300)]
    data = b" ".join(r.choice(words) for _ in range(20000))
    assert zstandard.ZstdCompressor(level=3).compress(data) != zstandard.ZstdCompressor(level=4).compress(data)
    packed = cb.generic_compress(data, "zstd")
    assert packed == zstandard.ZstdCompressor(level=3).compress(data)
    assert cb.generic_compress(data, "zstd", 9) == zstandard.ZstdCompressor(level=9).compress(data)
    assert cb.generic_decompress(packed, "zstd") == data


def test_tensor_bytes_and_payload_helpers():
    nested = {"a": torch.zeros(3, dtype=torch.float64), "b": [torch.zeros(2, 2, dtype=torch.int16), (torch.zeros(5,
              dtype=torch.uint8), 7)], "c": "x"}
    assert cb._tensor_bytes(nested) == 3 * 8 + 4 * 2 + 5
    assert cb._tensor_bytes(3.5) == 0
    u = cb.as_u8(b"\x01\x02\xff")
    assert u.dtype == torch.uint8 and u.tolist() == [1, 2, 255]
    assert cb.as_u8(b"").numel() == 0
    assert bytes(cb._raw(u)) == b"\x01\x02\xff"
    assert cb._raw(b"ab") == b"ab" and cb._raw(bytearray(b"ab")) == bytearray(b"ab")
    for bad in (torch.zeros(3, dtype=torch.int32), torch.zeros((2, 2), dtype=torch.uint8), "ab"):
        with pytest.raises(ValueError, match="payload"):
            cb._raw(bad)
    assert cb._local("a/b.ckpt") and cb._local(__import__("pathlib").Path("x"))
    assert not cb._local("s3://bucket/x.ckpt") and not cb._local(None)


def test_decode_checks():
    c = _callback("zlib")
    plain = {"state_dict": _tuned()}
    assert c.decode(dict(plain)) == plain  # not an FM-Delta checkpoint: passed through
    with pytest.raises(ValueError, match="malformed"):
        c.decode({cb.KEY: {"version": 2}})
    with pytest.raises(ValueError, match="malformed"):
        c.decode({cb.KEY: [1, 2]})
    out = c.encode({"state_dict": _tuned(), "optimizer_states": [OPT]})
    blob = out[cb.KEY]
    flipped = blob["optimizer_states"].clone()
    flipped[len(flipped) // 2] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        c.decode({cb.KEY: dict(blob, optimizer_states=flipped)})
    # without a stored checksum (older files) a corrupt stream is still a ValueError naming the key
    old = {k: v for k, v in blob.items() if k != "optimizer_states_crc32"}
    with pytest.raises(ValueError, match="optimizer_states is corrupt"):
        c.decode({cb.KEY: dict(old, optimizer_states=cb.as_u8(b"not zlib at all"))})
    assert "optimizer_states" in c.decode({cb.KEY: dict(old)})  # no checksum stored: decoded as is
    fresh = cb.FMDeltaCheckpoint()
    with pytest.raises(RuntimeError, match="no base"):
        fresh.decode({cb.KEY: dict(blob)})
    with pytest.raises(RuntimeError, match="no base"):
        fresh.encode({"state_dict": _tuned()})


def test_load_fmdelta_checkpoint_file(tmp_path):
    c = _callback()
    path = tmp_path / "x.ckpt"
    torch.save(c.encode({"state_dict": _tuned(), "epoch": 1}), path)
    back = cb.load_fmdelta_checkpoint(path, _state(0))
    assert back["epoch"] == 1 and torch.equal(back["state_dict"]["w"], _tuned()["w"])


def test_setup_wraps_the_checkpoint_io_once_and_snapshots_the_base():
    model = torch.nn.Linear(3, 2)
    inner = TorchCheckpointIO()
    trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(checkpoint_io=inner))
    c = cb.FMDeltaCheckpoint()
    c.setup(trainer, model, "fit")
    io_ = trainer.strategy.checkpoint_io
    assert isinstance(io_, cb.FMDeltaCheckpointIO) and io_.inner is inner and io_.owner is c
    assert isinstance(io_.writer, cb.AtomicCheckpointIO)
    assert torch.equal(c.base["weight"], model.weight) and c.base["weight"].data_ptr() != model.weight.data_ptr()
    assert c.base_fp == state_fingerprint(c.base)
    with torch.no_grad():
        model.weight.add_(1.0)
    c.setup(trainer, model, "fit")  # a second setup keeps the first base and does not wrap twice
    assert trainer.strategy.checkpoint_io is io_ and not torch.equal(c.base["weight"], model.weight)
    other = types.SimpleNamespace(load_checkpoint=None)
    assert cb.FMDeltaCheckpointIO(other, c).writer is other


def test_atomic_checkpoints_swap_only_the_default_writer(tmp_path):
    trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(checkpoint_io=TorchCheckpointIO()))
    cb.AtomicCheckpoints().setup(trainer, None, "fit")
    assert type(trainer.strategy.checkpoint_io) is cb.AtomicCheckpointIO
    custom = cb.AtomicCheckpointIO()
    trainer.strategy.checkpoint_io = custom
    cb.AtomicCheckpoints().setup(trainer, None, "fit")
    assert trainer.strategy.checkpoint_io is custom
    path = tmp_path / "deep" / "deeper" / "c.ckpt"  # missing parent folders are made
    custom.save_checkpoint({"a": torch.zeros(2)}, str(path))
    custom.save_checkpoint({"a": torch.ones(2)}, str(path))  # the folder exists now: replaced in place
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["c.ckpt"]


@pytest.mark.parametrize("context", [None, True, False])
def test_context_setting_reaches_the_delta_records(context):
    from memfit.compression.container import DeltaReader

    c = cb.FMDeltaCheckpoint() if context is None else cb.FMDeltaCheckpoint(context=context)
    c.base = _state(0)
    c.base_fp = state_fingerprint(c.base)
    blob = c.encode({"state_dict": _tuned()})[cb.KEY]
    with DeltaReader(io.BytesIO(bytes(blob["state_dict"].numpy()))) as r:
        flags = [m["context"] for m, _ in r if "context" in m]
    assert flags and all(f is (context is not False) for f in flags)  # on by default


class _Opaque:
    """Not on torch's weights-only allowlist."""


def test_load_fmdelta_checkpoint_is_weights_only(tmp_path):
    import pickle

    c = _callback()
    path = tmp_path / "x.ckpt"
    torch.save({**c.encode({"state_dict": _tuned()}), "extra": _Opaque()}, path)
    with pytest.raises(pickle.UnpicklingError):
        cb.load_fmdelta_checkpoint(path, _state(0))


def test_optimizer_state_is_loaded_weights_only():
    c = _callback("zlib")
    out = c.encode({"state_dict": _tuned(), "optimizer_states": [{"x": _Opaque()}]})
    with pytest.raises(ValueError, match="optimizer_states is corrupt"):
        c.decode(out)


def test_atomic_writer_delegates_remote_paths_and_storage_options(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint",
                        lambda self, ckpt, path, storage_options=None: seen.append((str(path), storage_options)))
    io_ = cb.AtomicCheckpointIO()
    io_.save_checkpoint({"a": 1}, "memory://bucket/c.ckpt")  # not a local path: Lightning's (fsspec) writer
    io_.save_checkpoint({"a": 1}, str(tmp_path / "d.ckpt"), storage_options={"x": 1})
    assert seen == [("memory://bucket/c.ckpt", None), (str(tmp_path / "d.ckpt"), {"x": 1})]
    assert list(tmp_path.iterdir()) == []
    io_.save_checkpoint({"a": 1}, str(tmp_path / "e.ckpt"))  # local, no options: written here, atomically
    assert len(seen) == 2 and (tmp_path / "e.ckpt").exists()
