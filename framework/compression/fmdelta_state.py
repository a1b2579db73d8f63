"""FM-Delta of in-memory state dicts (the checkpoint callback's format): a container file of tensor records."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, BinaryIO

import torch

from memfit.compression.container import ContainerError, DeltaReader, DeltaWriter
from memfit.compression.fmdelta_records import BaseMismatchError, decode_record, encode_record, state_fingerprint


def save_state_delta(f: BinaryIO | str | os.PathLike, state: Mapping[str, torch.Tensor],
                     base: Mapping[str, torch.Tensor], *, context: bool = True, base_fp: str | None = None,
                     extra: dict[str, Any] | None = None) -> None:
    """Write `state` as FM-Delta against `base` (same names where delta-coded; others stored whole)."""
    header = {"kind": "state_dict", "base_fingerprint": base_fp or state_fingerprint(base), **(extra or {})}
    with DeltaWriter(f, header) as w:
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"state[{name!r}] is a {type(t).__name__}, not a tensor")
            w.add(*encode_record(name, t, base.get(name), context=context))


def load_state_delta(f: BinaryIO | str | os.PathLike, base: Mapping[str, torch.Tensor], *,
                     base_fp: str | None = None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict written by `save_state_delta`; BaseMismatchError when `base` is not the one it used."""
    with DeltaReader(f) as r:
        want = r.header.get("base_fingerprint")
        have = base_fp or state_fingerprint(base)
        if want != have:
            raise BaseMismatchError(f"delta was made against base {str(want)[:16]}..., the given base is "
                                    f"{have[:16]}...: wrong base model")
        out: dict[str, torch.Tensor] = {}
        for meta, payload in r:
            if meta.get("kind") != "tensor":
                raise ContainerError(f"{r.name}: record of kind {str(meta.get('kind'))[:40]!r} in a state-dict delta")
            t = decode_record(meta, payload, base.get, device)  # validates the meta, name included
            if meta["name"] in out:
                raise ContainerError(f"{r.name}: tensor {meta['name']!r} appears twice")
            out[meta["name"]] = t
        return out
