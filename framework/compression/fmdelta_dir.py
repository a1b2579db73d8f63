"""FM-Delta of HF safetensors checkpoint directories, streamed one tensor at a time.

compress: every file of the fine-tuned directory becomes records: a .safetensors file as its verbatim header plus one
tensor record per tensor (delta-coded against the base tensor of the same name when dtype and shape match), any other
file (config, tokenizer) stored whole. decompress rebuilds every file byte for byte. Memory: the largest tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from memfit.compression.container import ContainerError, DeltaReader, DeltaWriter
from memfit.compression.fmdelta_records import BaseMismatchError, crc, decode_record, encode_record, fingerprint
from memfit.compression.safetensors_dir import BaseIndex, list_files, parse, read_tensor


def structure_hash(index: BaseIndex) -> str:
    return hashlib.sha256(json.dumps(index.structure()).encode()).hexdigest()


def _bar(total: int, desc: str, show: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not show)


def compress_dir(base_dir: Path, ft_dir: Path, out: Path, *, context: bool = True, progress: bool = True
                 ) -> dict[str, Any]:
    """Write `out`; returns {raw_bytes, stored_bytes} of the fine-tuned directory."""
    base, ft_dir = BaseIndex(base_dir), Path(ft_dir)
    files = list_files(ft_dir)
    total = sum((ft_dir / f).stat().st_size for f in files)
    base_crcs: dict[str, int] = {}
    header = {"kind": "directory", "base_structure": structure_hash(base), "context": context}
    with DeltaWriter(out, header) as w, _bar(total, "compress", progress) as bar:
        for rel in files:
            path = ft_dir / rel
            st = parse(path) if rel.suffix == ".safetensors" else None
            if st is None or not st.contiguous:
                w.add({"kind": "file", "name": str(rel), "crc": zlib.crc32(path.read_bytes())}, [path.read_bytes()])
                bar.update(path.stat().st_size)
                continue
            w.add({"kind": "st_file", "name": str(rel), "size": st.size, "tensors": len(st.tensors)}, [st.header])
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
    return {"raw_bytes": total, "stored_bytes": out.stat().st_size}


def _check_base(r: DeltaReader, base: BaseIndex) -> None:
    if r.header.get("kind") != "directory":
        raise ContainerError(f"{r.name} is an FM-Delta of a {r.header.get('kind')}, not of a checkpoint directory")
    if r.header.get("base_structure") != structure_hash(base):
        raise BaseMismatchError(f"{r.name} was made against a different base model (tensor names, dtypes or shapes "
                                f"differ from {base.root})")


def walk(base_dir: Path, delta: Path, emit: Callable[[str, bytes | None, bool], None], progress: bool = True) -> None:
    """Decode every record in order; emit(relpath, chunk, new_file) receives the rebuilt files' bytes."""
    base = BaseIndex(base_dir)
    with DeltaReader(delta) as r:
        _check_base(r, base)
        total = r.footer.get("raw_bytes") or 0
        current: dict[str, Any] = {}
        with _bar(total, "decompress", progress) as bar:
            for meta, payload in r:
                kind = meta.get("kind")
                if kind == "file":
                    if zlib.crc32(payload) != meta["crc"]:
                        raise ContainerError(f"file {meta['name']!r} in {delta} is corrupt")
                    _finish(current)
                    emit(meta["name"], bytes(payload), True)
                    current = {}
                    bar.update(len(payload))
                elif kind == "st_file":
                    _finish(current)
                    current = {"name": meta["name"], "left": int(meta["tensors"]), "size": int(meta["size"]),
                               "written": len(payload)}
                    emit(meta["name"], bytes(payload), True)
                    bar.update(len(payload))
                elif kind == "tensor":
                    if not current or current["left"] <= 0:
                        raise ContainerError(f"tensor record {meta.get('name')!r} outside any safetensors file")
                    t = decode_record(meta, payload, base.get)
                    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                    emit(current["name"], data, False)
                    current["left"] -= 1
                    current["written"] += len(data)
                    bar.update(len(data))
                else:
                    raise ContainerError(f"unknown record kind {kind!r} in {delta}")
        _finish(current)


def _finish(current: dict[str, Any]) -> None:
    if current and (current["left"] != 0 or current["written"] != current["size"]):
        raise ContainerError(f"safetensors file {current['name']!r} is incomplete in the delta "
                             f"({current['left']} tensors missing)")


def decompress_dir(base_dir: Path, delta: Path, out_dir: Path, progress: bool = True) -> None:
    """Rebuild the fine-tuned directory into `out_dir`. Files are written into a temporary directory beside it and
    moved in only once every record has decoded and checked out: a wrong base, a corrupt or truncated delta never
    leaves a partial model file in `out_dir` (nor overwrites one there)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    handles: dict[str, Any] = {}
    written: list[str] = []

    def emit(rel: str, chunk: bytes, new: bool) -> None:
        if new:
            for h in handles.values():
                h.close()
            handles.clear()
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            handles[rel] = open(p, "wb")
            written.append(rel)
        handles[rel].write(chunk)

    try:
        walk(base_dir, delta, emit, progress)
        for h in handles.values():
            h.close()  # flushed before the files move
        handles.clear()
        for rel in written:
            dst = out_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, dst)
    finally:
        for h in handles.values():
            h.close()
        shutil.rmtree(tmp, ignore_errors=True)


def verify_dir(base_dir: Path, delta: Path, ft_dir: Path | None = None, progress: bool = True) -> int:
    """Decode everything (all checksums) without writing; with ft_dir also compare every file byte for byte."""
    state: dict[str, Any] = {"files": 0}

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

    walk(base_dir, delta, emit, progress)
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
    from memfit.compression.fmdelta_codec import payload_stats
    from memfit.compression.fmdelta_records import DTYPES

    rows = []
    with DeltaReader(delta) as r:
        for meta, payload in r:
            if meta.get("kind") != "tensor":
                rows.append({"name": meta["name"], "dtype": "-", "mode": meta["kind"], "raw": len(payload),
                             "stored": len(payload)})
                continue
            numel = 1
            for s in meta["shape"]:
                numel *= int(s)
            raw = numel * torch.empty((), dtype=DTYPES[meta["dtype"]]).element_size()
            row = {"name": meta["name"], "dtype": meta["dtype"], "mode": meta["mode"], "raw": raw,
                   "stored": len(payload)}
            if meta["mode"] == "delta":
                row.update(payload_stats(meta))
            rows.append(row)
    return rows
