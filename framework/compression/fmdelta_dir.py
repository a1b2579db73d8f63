"""FM-Delta of HF safetensors checkpoint directories, streamed one tensor at a time.

compress: every file of the fine-tuned directory becomes records: a .safetensors file as its verbatim header plus one
tensor record per tensor (delta-coded against the base tensor of the same name when dtype and shape match), any other
file (config, tokenizer) stored whole. decompress rebuilds every file byte for byte. Memory: the largest tensor.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from memfit.compression.container import ContainerError, DeltaReader, DeltaWriter
from memfit.compression.fmdelta_records import (
    BaseMismatchError,
    check_tensor_meta,
    crc,
    decode_record,
    encode_record,
    fingerprint,
    tensor_bytes,
)
from memfit.compression.safe_io import StagedDir, require_dir, require_file, safe_relpath
from memfit.compression.safetensors_dir import BaseIndex, SafetensorsFile, list_files, parse, parse_header, read_tensor


def structure_hash(index: BaseIndex) -> str:
    return hashlib.sha256(json.dumps(index.structure()).encode()).hexdigest()


def _bar(total: int, desc: str, show: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not show)


def compress_dir(base_dir: Path, ft_dir: Path, out: Path, *, context: bool = True, progress: bool = True
                 ) -> dict[str, Any]:
    """Write `out` (atomically: a failure or signal leaves no partial file); returns {raw_bytes, stored_bytes}."""
    require_dir(base_dir, "base model folder")
    ft_dir = require_dir(ft_dir, "fine-tuned model folder")
    base = BaseIndex(base_dir)
    files = list_files(ft_dir)
    total = sum((ft_dir / f).stat().st_size for f in files)
    base_crcs: dict[str, int] = {}
    header = {"kind": "directory", "base_structure": structure_hash(base), "context": context}
    with DeltaWriter(out, header) as w, _bar(total, "compress", progress) as bar:
        for rel in files:
            path = ft_dir / rel
            name = rel.as_posix()
            safe_relpath(name, f"file in {ft_dir}")  # the decoder will refuse it: fail now, not at decompress
            st = parse(path) if rel.suffix == ".safetensors" else None
            if st is None or not st.contiguous:
                data = path.read_bytes()
                w.add({"kind": "file", "name": name, "crc": zlib.crc32(data)}, [data])
                bar.update(len(data))
                continue
            w.add({"kind": "st_file", "name": name, "size": st.size, "tensors": len(st.tensors)}, [st.header])
            bar.update(len(st.header))
            for e in st.tensors:
                t = read_tensor(e)
                b = base.get(e.name)
                if b is not None:
                    base_crcs[e.name] = crc(b)
                w.add(*encode_record(e.name, t, b, context=context))
                bar.update(e.nbytes)
        for name, e in base.entries.items():  # fingerprint covers the whole base, used or not
            if name not in base_crcs:
                base_crcs[name] = crc(read_tensor(e))
        fp = fingerprint((n, str(e.dtype), list(e.shape), base_crcs[n]) for n, e in base.entries.items())
        w.footer.update(base_fingerprint=fp, raw_bytes=total)
    return {"raw_bytes": total, "stored_bytes": Path(out).stat().st_size}


def _check_base(r: DeltaReader, base: BaseIndex) -> None:
    if r.header.get("kind") != "directory":
        raise ContainerError(f"{r.name} is an FM-Delta of a {str(r.header.get('kind'))[:40]}, not of a checkpoint "
                             "directory")
    if r.header.get("base_structure") != structure_hash(base):
        raise BaseMismatchError(f"{r.name} was made against a different base model (tensor names, dtypes or shapes "
                                f"differ from {base.root})")


def _uint(v: object) -> bool:
    return type(v) is int and v >= 0


class _StFile:
    """The safetensors file being rebuilt: its header's tensors, which the following tensor records must match."""

    def __init__(self, name: str, meta: dict[str, Any], header: bytes, where: str):
        size, count = meta.get("size"), meta.get("tensors")
        if not (_uint(size) and _uint(count)):
            raise ContainerError(f"{where}: malformed size or tensor count")
        self.name = name
        self.entries = parse_header(header, size, where)
        if len(self.entries) != count or not SafetensorsFile(Path(name), header, self.entries, size).contiguous:
            raise ContainerError(f"{where}: header does not describe {count} contiguous tensors")
        self.done = 0

    def expect(self, meta: dict[str, Any]) -> None:
        name, dtype, shape = check_tensor_meta(meta)
        if self.done >= len(self.entries):
            raise ContainerError(f"tensor record {name!r} beyond the tensors of {self.name!r}")
        e = self.entries[self.done]
        if (name, dtype, tuple(shape)) != (e.name, e.dtype, e.shape):
            raise ContainerError(f"tensor record {name!r} does not match tensor {e.name!r} of {self.name!r}'s header")
        self.done += 1

    def finish(self) -> None:
        if self.done != len(self.entries):
            raise ContainerError(f"safetensors file {self.name!r} is incomplete in the delta "
                                 f"({len(self.entries) - self.done} tensors missing)")


def walk(base_dir: Path, delta: Path, emit: Callable[[str, bytes, bool], None], progress: bool = True) -> None:
    """Decode every record in order; emit(relpath, chunk, new_file) receives the rebuilt files' bytes. Every name is
    validated (safe_relpath, no duplicates) and every byte checked before it is emitted."""
    require_file(delta, "FM-Delta file")
    base = BaseIndex(require_dir(base_dir, "base model folder"))
    with DeltaReader(delta) as r:
        _check_base(r, base)
        total = r.footer.get("raw_bytes")
        if not _uint(total):
            raise ContainerError(f"{delta}: footer has no valid size of the fine-tuned folder")
        current: _StFile | None = None
        seen: set[str] = set()
        rebuilt = 0

        def out(name: str, data: bytes, new: bool) -> None:
            nonlocal rebuilt
            rebuilt += len(data)
            bar.update(len(data))
            emit(name, data, new)

        with _bar(total, "decompress", progress) as bar:
            for meta, payload in r:
                kind = meta.get("kind")
                if kind in ("file", "st_file"):
                    if current is not None:
                        current.finish()
                    name = safe_relpath(meta.get("name")).as_posix()
                    if name in seen:
                        raise ContainerError(f"record {name!r} appears twice in {delta}")
                    seen.add(name)
                if kind == "file":
                    if not _uint(meta.get("crc")) or zlib.crc32(payload) != meta["crc"]:
                        raise ContainerError(f"file {name!r} in {delta} is corrupt")
                    current = None
                    out(name, bytes(payload), True)
                elif kind == "st_file":
                    current = _StFile(name, meta, bytes(payload), f"{delta}: safetensors file {name!r}")
                    out(name, bytes(payload), True)
                elif kind == "tensor":
                    if current is None:
                        raise ContainerError(f"tensor record {str(meta.get('name'))[:80]!r} outside any safetensors "
                                             "file")
                    current.expect(meta)
                    out(current.name, tensor_bytes(decode_record(meta, payload, base.get)).tobytes(), False)
                else:
                    raise ContainerError(f"unknown record kind {str(kind)[:40]!r} in {delta}")
        if current is not None:
            current.finish()
        if rebuilt != total:  # records dropped (or added) in a file whose checksums were recomputed
            raise ContainerError(f"{delta} rebuilds {rebuilt} bytes, its footer says {total}: records are missing")


def decompress_dir(base_dir: Path, delta: Path, out_dir: Path, progress: bool = True) -> None:
    """Rebuild the fine-tuned directory into `out_dir`. Files are built in a staging folder (StagedDir) and moved in
    only once every record has decoded and checked out: a wrong base, a corrupt, truncated or crafted delta, an error
    or a signal never leaves a partial file in `out_dir`, never overwrites one there, and never writes outside it."""
    require_file(delta, "FM-Delta file")
    require_dir(base_dir, "base model folder")
    with StagedDir(out_dir) as stage:
        handle: list[Any] = [None]

        def emit(rel: str, chunk: bytes, new: bool) -> None:
            if new:
                handle[0] = stage.open(rel)
            handle[0].write(chunk)

        walk(base_dir, delta, emit, progress)
        stage.commit()


def verify_dir(base_dir: Path, delta: Path, ft_dir: Path | None = None, progress: bool = True) -> int:
    """Decode everything (all checksums) without writing; with ft_dir also compare every file byte for byte."""
    state: dict[str, Any] = {"files": 0}
    if ft_dir is not None:
        require_dir(ft_dir, "fine-tuned model folder")

    def emit(rel: str, chunk: bytes, new: bool) -> None:
        if ft_dir is None:
            state["files"] += int(new)
            return
        if new:
            if state.get("f"):
                _close_compare(state)
            state["f"] = open(Path(ft_dir) / rel, "rb")
            state["rel"] = rel
            state["files"] += 1
        if state["f"].read(len(chunk)) != chunk:
            raise ValueError(f"decoded {rel!r} differs from {Path(ft_dir) / rel}")

    try:
        walk(base_dir, delta, emit, progress)
    except BaseException:
        if state.get("f"):
            state["f"].close()
        raise
    if state.get("f"):
        _close_compare(state)
    return state["files"]


def _close_compare(state: dict[str, Any]) -> None:
    extra = state["f"].read(1)
    state["f"].close()
    state["f"] = None
    if extra:
        raise ValueError(f"{state['rel']!r}: the original is longer than the decoded file")


def stats(delta: Path) -> list[dict[str, Any]]:
    """Per record: name, dtype, mode, raw and stored bytes (no base needed)."""
    from memfit.kernels.fmdelta import payload_stats

    rows = []
    with DeltaReader(require_file(delta, "FM-Delta file")) as r:
        for meta, payload in r:
            kind = meta.get("kind")
            if kind in ("file", "st_file"):
                name = safe_relpath(meta.get("name")).as_posix()
                rows.append({"name": name, "dtype": "-", "mode": kind, "raw": len(payload), "stored": len(payload)})
                continue
            if kind != "tensor":
                raise ContainerError(f"unknown record kind {str(kind)[:40]!r} in {delta}")
            name, dtype, shape = check_tensor_meta(meta)
            numel = 1
            for s in shape:
                numel *= s
            raw = numel * torch.empty((), dtype=dtype).element_size()
            row = {"name": name, "dtype": meta["dtype"], "mode": meta["mode"], "raw": raw, "stored": len(payload)}
            if meta["mode"] == "delta":
                row.update(payload_stats(meta, payload, numel))
            rows.append(row)
    return rows
