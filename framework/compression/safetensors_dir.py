"""Streaming access to HF safetensors checkpoint directories: parse headers, read one tensor at a time.

The header is parsed here (not by the safetensors library) so that a file can be rebuilt byte for byte: its header
bytes are kept verbatim and its tensors are written back in data-offset order.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
}
for _st, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"),
                   ("U64", "uint64")):
    if hasattr(torch, _name):
        ST_DTYPES[_st] = getattr(torch, _name)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset
    nbytes: int


@dataclass(frozen=True)
class SafetensorsFile:
    path: Path
    header: bytes  # the 8-byte length prefix and the JSON header, verbatim
    tensors: list[TensorEntry]  # in data-offset order
    size: int

    @property
    def contiguous(self) -> bool:
        """The tensors tile the data region exactly (so the file is rebuilt from header + tensors)."""
        pos = len(self.header)
        for t in self.tensors:
            if t.start != pos:
                return False
            pos += t.nbytes
        return pos == self.size


def parse_header(header: bytes, size: int, where: str, path: Path | None = None) -> list[TensorEntry]:
    """The tensors (in data-offset order) of a safetensors header: its 8-byte length prefix and JSON, verbatim, for a
    file of `size` bytes. ValueError naming `where` and the tensor for anything malformed (untrusted input)."""
    if len(header) < 8:
        raise ValueError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", header[:8])
    if n > size - 8 or len(header) != 8 + n:
        raise ValueError(f"{where}: safetensors header length {n} exceeds the file size {size}")
    try:
        hdr = json.loads(header[8:])
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{where}: corrupt safetensors header ({str(e)[:200]})") from None
    if not isinstance(hdr, dict):
        raise ValueError(f"{where}: corrupt safetensors header (not a JSON object)")
    data0 = 8 + n
    entries = []
    for name, info in hdr.items():
        if name == "__metadata__":
            continue
        shown = repr(name[:80])
        if not isinstance(info, dict) or info.get("dtype") not in ST_DTYPES:
            raise ValueError(f"{where}: tensor {shown} has no supported dtype ({str(info)[:80]})")
        dtype = ST_DTYPES[info["dtype"]]
        offs, shape = info.get("data_offsets"), info.get("shape")
        if not (_ints(offs) and len(offs) == 2 and _ints(shape)) or min([*offs, *shape], default=0) < 0:
            raise ValueError(f"{where}: tensor {shown} has malformed offsets or shape")
        s, e = offs
        numel = 1
        for d in shape:
            numel *= d
        if e - s != numel * torch.empty((), dtype=dtype).element_size() or data0 + e > size:
            raise ValueError(f"{where}: tensor {shown} offsets {s}..{e} do not match its shape or the file size")
        entries.append(TensorEntry(name, path or Path(where), dtype, tuple(shape), data0 + s, e - s))
    entries.sort(key=lambda t: t.start)
    return entries


def _ints(v: object) -> bool:
    return isinstance(v, list) and all(type(x) is int for x in v)


def parse(path: Path) -> SafetensorsFile:
    """Parse a .safetensors header with clear errors for truncated or malformed files."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: safetensors header length {n} exceeds the file size {size}")
        raw = f.read(n)
    entries = parse_header(head + raw, size, str(path), path)
    return SafetensorsFile(path, head + raw, entries, size)


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """One tensor from disk (memory: that tensor only)."""
    buf = bytearray(entry.nbytes)
    with open(entry.path, "rb") as f:
        f.seek(entry.start)
        if f.readinto(buf) != entry.nbytes:
            raise ValueError(f"{entry.path}: truncated while reading tensor {entry.name!r}")
    return torch.frombuffer(buf, dtype=torch.uint8).view(entry.dtype).reshape(entry.shape) if buf else \
        torch.empty(entry.shape, dtype=entry.dtype)


def list_files(root: Path) -> list[Path]:
    """Every regular file under `root`, relative, sorted (hidden and cache folders included: bit-exact copies)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


class BaseIndex:
    """Name -> tensor location over every .safetensors file of a base checkpoint directory."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.entries: dict[str, TensorEntry] = {}
        files = [p for p in list_files(self.root) if p.suffix == ".safetensors"]
        if not files:
            raise FileNotFoundError(f"base directory {root} holds no .safetensors file")
        for rel in files:
            for t in parse(self.root / rel).tensors:
                self.entries.setdefault(t.name, t)

    def get(self, name: str) -> torch.Tensor | None:
        e = self.entries.get(name)
        return None if e is None else read_tensor(e)

    def structure(self) -> list[tuple[str, str, list[int]]]:
        return sorted((n, str(e.dtype), list(e.shape)) for n, e in self.entries.items())
