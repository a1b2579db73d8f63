"""Helpers for the untrusted-input tests: a small checkpoint pair, crafted deltas with valid checksums, and snapshots
of a sandbox tree (every file's bytes, every folder and symlink) to prove that nothing was written or left over."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from memfit.compression.container import DeltaReader, DeltaWriter

Record = tuple[dict[str, Any], bytes]


def specials(dtype: torch.dtype) -> torch.Tensor:
    """NaN (two payloads), +-0, +-inf, subnormals, extremes: bit patterns a codec must keep exactly."""
    info = torch.finfo(dtype)
    t = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), info.tiny / 4, -info.tiny / 8, info.max,
                      -info.max, 1.0], dtype=dtype)
    it = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    bits = t.view(it).clone()
    bits[4] |= 0x5  # a NaN with a payload
    return bits.view(dtype)


def make_pair(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """base/ and ft/ checkpoint folders: float tensors of every codable dtype (specials included), an int tensor,
    empty and 0-d tensors, a nested tokenizer file and a config; ft = base + small deltas."""
    g = torch.Generator().manual_seed(seed)
    base_t = {
        "w32": 0.02 * torch.randn(96, 64, generator=g),
        "wbf": (0.02 * torch.randn(40, 32, generator=g)).bfloat16(),
        "w16": (0.02 * torch.randn(300, generator=g)).half(),
        "ids": torch.arange(50),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(0.5),
    }
    ft_t = {k: (v.double() + 1e-4 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype)
            if v.is_floating_point() else v + 1 for k, v in base_t.items()}
    ft_t["w32"][0, :10] = specials(torch.float32)
    ft_t["wbf"][0, :10] = specials(torch.bfloat16)
    paths = []
    for name, tensors in (("base", base_t), ("ft", ft_t)):
        d = root / name
        (d / "tok").mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps({"name": name}))
        (d / "tok" / "tokenizer.json").write_text('{"vocab": [1, 2, 3]}')
        paths.append(d)
    return paths[0], paths[1]


def read_records(delta: Path) -> tuple[dict[str, Any], dict[str, Any], list[Record]]:
    """(header, footer without its index, records) of a delta file."""
    with DeltaReader(delta) as r:
        recs = [(dict(m), bytes(p)) for m, p in r]
        return dict(r.header), {k: v for k, v in r.footer.items() if k != "records"}, recs


def write_records(path: Path, header: dict[str, Any], footer: dict[str, Any], recs: list[Record]) -> Path:
    """A delta with valid checksums around whatever records are given (a crafted file)."""
    with DeltaWriter(path, header) as w:
        for meta, payload in recs:
            w.add(meta, [payload])
        w.footer.update(footer)
    return path


def craft(src: Path, dst: Path, edit: Callable[[list[Record]], list[Record]],
          edit_header: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Path:
    header, footer, recs = read_records(src)
    if edit_header is not None:
        header = edit_header(header)
    return write_records(dst, header, footer, edit([(dict(m), p) for m, p in recs]))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root (symlinks not followed): kind, and content hash for files / target for links."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def same_tree(a: Path, b: Path) -> bool:
    """Two folders hold the same files with the same bytes."""
    sa, sb = snapshot(a), snapshot(b)
    return sa == sb
