"""FM-Delta container and state-dict deltas: round trips with mixed records, and every way a file can be bad."""

from __future__ import annotations

import io

import pytest
import torch

from memfit.compression.container import MAGIC, ContainerError, DeltaReader, DeltaWriter
from memfit.compression.fmdelta_records import BaseMismatchError
from memfit.compression.fmdelta_state import load_state_delta, save_state_delta


def states(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = {
        "w32": torch.randn(64, 48, generator=g),
        "w16": torch.randn(300, generator=g).half(),
        "wbf": torch.randn(17, 5, generator=g).bfloat16(),
        "w64": torch.randn(33, generator=g, dtype=torch.float64),
        "steps": torch.arange(10),
        "reshaped": torch.randn(6, 4, generator=g),
    }
    ft = {k: (v.double() + 1e-3 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype)
          if v.is_floating_point() else v * 3 for k, v in base.items()}
    ft["reshaped"] = ft["reshaped"].reshape(4, 6)
    ft["new_head"] = torch.randn(3, 2, generator=g)
    ft["mask"] = torch.tensor([True, False, True])
    return base, ft


def encoded(base, ft) -> bytes:
    buf = io.BytesIO()
    save_state_delta(buf, ft, base)
    return buf.getvalue()


def test_state_round_trip_mixed_records() -> None:
    base, ft = states()
    out = load_state_delta(io.BytesIO(encoded(base, ft)), base)
    assert list(out) == list(ft)
    for k in ft:
        assert out[k].dtype == ft[k].dtype and out[k].shape == ft[k].shape
        assert torch.equal(out[k].reshape(-1).view(torch.uint8), ft[k].reshape(-1).view(torch.uint8)), k


def test_records_are_delta_or_raw_as_expected() -> None:
    base, ft = states()
    modes = {m["name"]: m["mode"] for m, _ in DeltaReader(io.BytesIO(encoded(base, ft)))}
    assert modes == {"w32": "delta", "w16": "delta", "wbf": "delta", "w64": "delta", "steps": "raw",
                     "reshaped": "raw", "new_head": "raw", "mask": "raw"}


def test_wrong_base_is_named() -> None:
    base, ft = states()
    blob = encoded(base, ft)
    other, _ = states(seed=1)
    with pytest.raises(BaseMismatchError, match="wrong base"):
        load_state_delta(io.BytesIO(blob), other)


def test_truncated_file() -> None:
    base, ft = states()
    blob = encoded(base, ft)
    for cut in (3, 20, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ContainerError, match="truncated|not an FM-Delta|corrupt"):
            load_state_delta(io.BytesIO(blob[:cut]), base)


def test_every_flipped_byte_is_detected() -> None:
    base, ft = states()
    blob = bytearray(encoded(base, ft))
    for pos in range(0, len(blob), max(1, len(blob) // 400)):
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        with pytest.raises(ValueError):  # ContainerError and BaseMismatchError are ValueErrors
            load_state_delta(io.BytesIO(bytes(bad)), base)


def test_flipped_payload_byte_names_the_record() -> None:
    base, ft = states()
    blob = bytearray(encoded(base, ft))
    r = DeltaReader(io.BytesIO(bytes(blob)))
    off = r.footer["records"][0]["offset"]
    blob[off + 100] ^= 1
    with pytest.raises(ContainerError, match="record 0 .*'w32'.* corrupt"):
        load_state_delta(io.BytesIO(bytes(blob)), base)


def test_version_and_magic_checked() -> None:
    base, ft = states()
    blob = bytearray(encoded(base, ft))
    blob[8] = 99
    with pytest.raises(ContainerError, match="version 99"):
        DeltaReader(io.BytesIO(bytes(blob)))
    with pytest.raises(ContainerError, match="not an FM-Delta"):
        DeltaReader(io.BytesIO(b"PK\x03\x04" + bytes(blob[4:])))


def test_writer_streams_parts_without_joining(tmp_path) -> None:
    path = tmp_path / "x.fmd"
    with DeltaWriter(path, {"kind": "test"}) as w:
        w.add({"kind": "blob", "name": "a"}, [b"ab", b"", b"cde"])
        w.add({"kind": "blob", "name": "b"})
    with DeltaReader(path) as r:
        got = [(m["name"], bytes(p)) for m, p in r]
    assert got == [("a", b"abcde"), ("b", b"")]
    assert path.read_bytes()[:8] == MAGIC and path.read_bytes()[-8:] == MAGIC
