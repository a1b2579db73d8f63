"""FM-Delta container: one file of self-checking records, written and read as a stream.

Layout (little-endian):
    b"FMDELTA\\0" | version u32 | header_len u32 | header JSON | crc32(header JSON) u32
    records: b"REC\\0" | meta_len u32 | payload_len u64 | meta JSON | payload | crc32(meta JSON + payload) u32
    footer:  b"END\\0" | index_len u32 | index JSON | crc32(index JSON) u32 | footer_len u64 | b"FMDELTA\\0"

The header carries the base model's fingerprint; the footer's index lists every record (name, offset) and is read
first, so a truncated file fails before any work. Every record is checked against its own crc32 before it is decoded
(a flipped byte names the record), and each decoded tensor against the crc32 of its bytes stored in its meta.
Memory stays bounded by the largest record.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from memfit.compression.safe_io import AtomicFile

MAGIC = b"FMDELTA\0"
VERSION = 1
_REC = b"REC\0"
_END = b"END\0"
_U32 = struct.Struct("<I")
_REC_HEAD = struct.Struct("<4sIQ")
_TAIL = struct.Struct("<Q8s")


class ContainerError(ValueError):
    """A delta file that is not one, is truncated, corrupt, of another version, or made for another base."""


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


class DeltaWriter:
    """Append records to a new container; `close()` writes the index footer (use as a context manager)."""

    def __init__(self, f: BinaryIO | str | os.PathLike, header: dict[str, Any]):
        # a path is written through an AtomicFile (a hidden temporary renamed by close()): a failed or interrupted
        # write never leaves a truncated container there, nor destroys the file it would have replaced
        self._atomic = AtomicFile(f) if not hasattr(f, "write") else None
        self.f: BinaryIO = self._atomic.f if self._atomic is not None else f  # type: ignore[assignment]
        self.index: list[dict[str, Any]] = []
        self.footer: dict[str, Any] = {}  # extra footer fields (known only at the end, e.g. a fingerprint)
        self.closed = False
        h = _json(header)
        try:
            self.f.write(MAGIC + _U32.pack(VERSION) + _U32.pack(len(h)) + h + _U32.pack(zlib.crc32(h)))
        except BaseException:
            self.abort()
            raise
        self.pos = len(MAGIC) + 8 + len(h) + 4

    def add(self, meta: dict[str, Any], parts: list[bytes] | tuple[bytes, ...] = ()) -> None:
        """One record: a JSON meta and a payload given as parts (written without joining them)."""
        m = _json(meta)
        size = sum(len(p) for p in parts)
        crc = zlib.crc32(m)
        self.f.write(_REC_HEAD.pack(_REC, len(m), size) + m)
        for p in parts:
            self.f.write(p)
            crc = zlib.crc32(p, crc)
        self.f.write(_U32.pack(crc))
        self.index.append({"kind": meta.get("kind"), "name": meta.get("name"), "offset": self.pos})
        self.pos += _REC_HEAD.size + len(m) + size + 4

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        idx = _json({**self.footer, "records": self.index})
        body = _END + _U32.pack(len(idx)) + idx + _U32.pack(zlib.crc32(idx))
        if self._atomic is None:
            self.f.write(body + _TAIL.pack(len(body), MAGIC))
            self.f.flush()
            return
        with self._atomic as f:  # renamed into place, or removed on any failure
            f.write(body + _TAIL.pack(len(body), MAGIC))

    def abort(self) -> None:
        """Drop a container that will not be finished (its temporary file, when writing to a path)."""
        self.closed = True
        if self._atomic is not None:
            self._atomic.discard()

    def __enter__(self) -> DeltaWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        self.closed = True
        if self._atomic is not None:  # removes the temporary file; a write error names the target, not the temporary
            self._atomic.__exit__(exc_type, exc, tb)


def load_json_object(raw: bytes | memoryview, what: str) -> dict[str, Any]:
    """Parse untrusted JSON that must be an object; ContainerError (never a RecursionError or TypeError) otherwise."""
    try:
        obj = json.loads(bytes(raw))
    except (ValueError, RecursionError) as e:
        raise ContainerError(f"{what} is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise ContainerError(f"{what} is not a JSON object")
    return obj


def _read_exact(f: IO[bytes], n: int, what: str) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise ContainerError(f"delta file truncated: {what} needs {n} bytes, found {len(b)}")
    return b


class DeltaReader:
    """Validate magic, version, header and footer on open; then iterate records, each checked by its crc32."""

    def __init__(self, f: BinaryIO | str | os.PathLike):
        self._own = not hasattr(f, "read")
        self.name = str(f) if self._own else getattr(f, "name", "<stream>")
        if self._own and Path(f).is_dir():  # type: ignore[arg-type]
            raise IsADirectoryError(errno.EISDIR, f"{self.name} is a directory, not an FM-Delta file")
        self.f: BinaryIO = open(f, "rb") if self._own else f  # type: ignore[arg-type]
        try:
            self.header = self._read_header()
            self.footer = self._read_footer()
        except Exception:
            self.close()
            raise

    def _read_header(self) -> dict[str, Any]:
        self.f.seek(0)
        magic = self.f.read(len(MAGIC))
        if magic != MAGIC:
            raise ContainerError(f"{self.name} is not an FM-Delta file (bad magic {magic[:8]!r})")
        (version,) = _U32.unpack(_read_exact(self.f, 4, "format version"))
        if version != VERSION:
            raise ContainerError(f"{self.name} has FM-Delta format version {version}; this reader supports {VERSION}")
        (n,) = _U32.unpack(_read_exact(self.f, 4, "header length"))
        h = _read_exact(self.f, n, "header")
        if _U32.unpack(_read_exact(self.f, 4, "header checksum"))[0] != zlib.crc32(h):
            raise ContainerError(f"{self.name}: header is corrupt (checksum mismatch)")
        self.data_start = self.f.tell()
        return load_json_object(h, f"{self.name}: header")

    def _read_footer(self) -> dict[str, Any]:
        end = self.f.seek(0, os.SEEK_END)
        if end < self.data_start + _TAIL.size:
            raise ContainerError(f"{self.name} is truncated: no footer (file ends at byte {end})")
        self.f.seek(end - _TAIL.size)
        size, magic = _TAIL.unpack(self.f.read(_TAIL.size))
        if magic != MAGIC or size > end - self.data_start - _TAIL.size or size < 12:
            raise ContainerError(f"{self.name} is truncated or its footer is corrupt (no end marker)")
        self.f.seek(end - _TAIL.size - size)
        body = self.f.read(size)
        (n,) = _U32.unpack(body[4:8])
        idx = body[8:8 + n]
        if body[:4] != _END or len(body) != 12 + n or _U32.unpack(body[8 + n:])[0] != zlib.crc32(idx):
            raise ContainerError(f"{self.name}: footer index is corrupt (checksum mismatch)")
        self.records_end = end - _TAIL.size - size
        footer = load_json_object(idx, f"{self.name}: footer index")
        records = footer.get("records")
        if not isinstance(records, list) or not all(
                isinstance(r, dict) and type(r.get("offset")) is int for r in records):
            raise ContainerError(f"{self.name}: footer index has no valid record list")
        return footer

    def __iter__(self) -> Iterator[tuple[dict[str, Any], memoryview]]:
        """(meta, payload) per record, in file order, each verified against its checksum first."""
        self.f.seek(self.data_start)
        expected = self.footer["records"]
        for i, entry in enumerate(expected):
            pos = self.f.tell()
            if pos != entry["offset"]:
                raise ContainerError(f"{self.name}: record {i} at byte {pos}, index says {entry['offset']}")
            tag, mlen, plen = _REC_HEAD.unpack(_read_exact(self.f, _REC_HEAD.size, f"record {i} header"))
            if tag != _REC or pos + _REC_HEAD.size + mlen + plen + 4 > self.records_end:
                raise ContainerError(f"{self.name}: record {i} ({entry.get('name')!r}) header is corrupt")
            m = _read_exact(self.f, mlen, f"record {i} meta")
            payload = _read_exact(self.f, plen, f"record {i} payload")
            (crc,) = _U32.unpack(_read_exact(self.f, 4, f"record {i} checksum"))
            if zlib.crc32(payload, zlib.crc32(m)) != crc:
                raise ContainerError(f"{self.name}: record {i} ({entry.get('name')!r}) is corrupt (checksum mismatch)")
            yield load_json_object(m, f"{self.name}: record {i} meta"), memoryview(payload)
        if self.f.tell() != self.records_end:
            raise ContainerError(f"{self.name}: unexpected bytes between the last record and the footer")

    def close(self) -> None:
        if self._own:
            self.f.close()

    def __enter__(self) -> DeltaReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
