"""FM-Delta records: one tensor (delta-coded against its base, or stored whole) as container meta + payload.

A tensor is delta-coded when the base holds a tensor of the same name, float dtype and shape; everything else
(integer tensors, buffers of other dtypes, new or reshaped names) is stored whole. Each record keeps the crc32 of the
decoded bytes, and delta records the crc32 of the base bytes they were made against, so decoding against another
base fails naming the tensor instead of producing wrong weights.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from memfit.compression.container import ContainerError
from memfit.compression.safe_io import check_record_name
from memfit.kernels.fmdelta import decode_delta, delta_codable, encode_delta

DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
}
for _name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        DTYPES[_name] = getattr(torch, _name)


class BaseMismatchError(ValueError):
    """The delta was made against a different base model (or a different version of it)."""


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"FM-Delta cannot store tensors of dtype {dtype}")
    return name


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes in row-major order (a host copy only when it lives elsewhere or is not contiguous)."""
    t = t.detach().contiguous().reshape(-1)
    if t.device.type != "cpu":
        t = t.cpu()
    return t.view(torch.uint8).numpy()


def crc(t: torch.Tensor) -> int:
    return zlib.crc32(tensor_bytes(t))


def fingerprint(entries: Iterable[tuple[str, str, list[int], int]]) -> str:
    """sha256 of (name, dtype, shape, crc32) of every base tensor, sorted by name: identifies a base model."""
    h = hashlib.sha256()
    for name, dt, shape, c in sorted(entries):
        h.update(f"{name}\0{dt}\0{list(shape)}\0{c}\n".encode())
    return h.hexdigest()


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    return fingerprint((k, dtype_name(v.dtype), list(v.shape), crc(v)) for k, v in state.items())


def encode_record(name: str, ft: torch.Tensor, base: torch.Tensor | None, *, context: bool = True
                  ) -> tuple[dict, list[bytes]]:
    """Meta + payload parts for one tensor; `base` None (or incompatible) stores it whole."""
    meta = {"kind": "tensor", "name": name, "dtype": dtype_name(ft.dtype), "shape": list(ft.shape), "crc": crc(ft)}
    if delta_codable(base, ft):
        cmeta, parts = encode_delta(base, ft, context=context)
        meta.update(mode="delta", base_crc=crc(base), **cmeta)
        return meta, parts
    meta["mode"] = "raw"
    return meta, [tensor_bytes(ft).tobytes()]


def check_tensor_meta(meta: dict) -> tuple[str, torch.dtype, list[int]]:
    """(name, dtype, shape) of a tensor record's meta read from a file, after checking every field decode_record
    uses; ContainerError naming the record otherwise (a crafted meta never reaches the codec as a TypeError)."""
    name = check_record_name(meta.get("name"))
    dt, shape, mode = meta.get("dtype"), meta.get("shape"), meta.get("mode")

    def bad(why: str) -> ContainerError:
        return ContainerError(f"record {name[:80]!r}: {why}")

    if not isinstance(dt, str) or dt not in DTYPES:
        raise bad(f"unknown dtype {str(dt)[:40]!r}")
    if not isinstance(shape, list) or len(shape) > 64 or not all(_uint(s, 1 << 48) for s in shape):
        raise bad(f"malformed shape {str(shape)[:80]}")
    if int(np.prod(shape, dtype=np.float64)) > 1 << 48:
        raise bad(f"shape {shape} is too large")
    if not _uint(meta.get("crc"), 1 << 32) or mode not in ("raw", "delta"):
        raise bad(f"malformed checksum or unknown mode {str(mode)[:40]!r}")
    if mode == "delta" and not _uint(meta.get("base_crc"), 1 << 32):
        raise bad("malformed base checksum")
    return name, DTYPES[dt], [int(s) for s in shape]


def _uint(v: object, limit: int) -> bool:
    return type(v) is int and 0 <= v < limit


def decode_record(meta: dict, payload: memoryview, base_of: Callable[[str], torch.Tensor | None],
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The tensor of one record, checked against its crc32; `base_of(name)` returns the base tensor or None."""
    name, dtype, shape = check_tensor_meta(meta)
    if meta["mode"] == "raw":
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(payload) != itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"record {name!r}: {len(payload)} bytes do not hold a {meta['dtype']} tensor {shape}")
        # torch.frombuffer refuses an empty buffer: a tensor with a 0 dimension has an empty payload
        flat = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if len(payload)
                else torch.empty(0, dtype=torch.uint8))
        out = flat.view(dtype).reshape(shape).to(device)
    else:
        base = base_of(name)
        if base is None:
            raise BaseMismatchError(f"tensor {name!r} is delta-coded but the base model has no tensor of that name: "
                                    "wrong base model")
        if base.dtype != dtype or list(base.shape) != shape:
            raise BaseMismatchError(f"tensor {name!r}: base has {base.dtype} {list(base.shape)}, the delta was made "
                                    f"against {meta['dtype']} {shape}: wrong base model")
        if crc(base) != meta["base_crc"]:
            raise BaseMismatchError(f"tensor {name!r} of the base differs from the one the delta was made against: "
                                    "wrong base model")
        try:
            out = decode_delta(base.to(device), meta, payload)
        except ValueError as e:
            raise ContainerError(f"record {name!r}: {e}") from None
    if crc(out) != meta["crc"]:
        raise ValueError(f"tensor {name!r} decoded to bytes whose checksum differs from the stored one (corrupt delta)")
    return out
