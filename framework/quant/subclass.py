"""The scaffolding NF4 and NeuZip weights share: a wrapper tensor subclass whose aten ops come from a per-class table.

A format's ops module fills its class's table with `@Format.implements(aten.op, ...)` (metadata ops, FSDP2's shard
ops, copies on the packed form); any op without an entry runs on dequantized copies, which is correct but dense. The
table lives on the class, so the tensor module never imports its ops module (no import loop): `memfit.quant`
imports every ops module when the package loads, so a table is full before any tensor of its class exists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.utils._pytree import tree_map

Op = Callable[..., Any]


def contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    """Row-major strides of `shape` (zero-sized dimensions count as 1, as torch does)."""
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(1, d)
    return tuple(reversed(strides))


class StorageTensor(torch.Tensor):
    """Base of the frozen-weight storage subclasses; subclasses define `dequantize()` and fill `OPS`."""

    OPS: ClassVar[dict[Any, Op]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.OPS = {}  # one table per format

    @classmethod
    def implements(cls, *ops: Any) -> Callable[[Op], Op]:
        """Register `fn(func, *args, **kwargs)` as this format's implementation of `ops`."""

        def wrap(fn: Op) -> Op:
            for op in ops:
                cls.OPS[op] = fn
            return fn

        return wrap

    def dequantize(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        fn = cls.OPS.get(func) or cls.OPS.get(func.overloadpacket)
        if fn is not None:
            return fn(func, *args, **kwargs)
        unpack = lambda t: t.dequantize() if isinstance(t, cls) else t  # noqa: E731
        return func(*tree_map(unpack, args), **tree_map(unpack, kwargs))
