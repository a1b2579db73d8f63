"""Run a test's gloo worker in N spawned processes, ending each successful child with os._exit(0).

Why: with torch's gloo backend a child that has already destroyed its process group can still abort at interpreter
exit ("terminate called without an active exception", SIGABRT) while C++ threads are torn down, which mp.spawn
reports as a failure although every assertion passed. A child that raises still fails the test as usual (mp.spawn
writes its traceback); only the exit after success skips the interpreter's teardown.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def _child(rank: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int) -> None:
    """mp.spawn(fn, args, nprocs) with the clean exit above; fn(rank, *args) must be a module-level function."""
    mp.spawn(_child, args=(fn, args), nprocs=nprocs, join=True)


def shard_mlp_pair(build: Callable[..., Any], world: int, *args: Any) -> tuple[Any, Any]:
    """(reference, sharded): two copies of `build(*args)` (an nn.Sequential whose layers 0, 2 and 4 are Linear), the
    second under FSDP2 on a CPU mesh of `world` ranks, each Linear its own unit (call inside an initialised group)."""
    import torch
    from torch.distributed.fsdp import fully_shard

    ref, model = build(*args), build(*args)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
    for lin in (model[0], model[2], model[4]):
        fully_shard(lin, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return ref, model
