"""Distributed CCE on CPU over gloo, 2 processes spawned inside the test: DTensor (FSDP2-style Shard(0)) weights and
vocabulary-parallel heads, checked against the single-process fp64 reference."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

from cce_common import make_inputs, reference, run_with_grads
from spawn import spawn

pytestmark = pytest.mark.usefixtures("cpu_triton")  # impl='triton' runs interpreted on CPU

N, V, D = 20, 131, 16  # V odd: the two vocabulary slices have different sizes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        from memfit.kernels.cce import linear_cross_entropy

        e, c, t = make_inputs(N, V, D, "peaked", seed=1, ignore_every=3)
        opts = {"softcap": 5.0, "label_smoothing": 0.1, "z_loss": 1e-3}
        results = {}
        # (1) FSDP2-style DTensor weight, sharded on the vocabulary dim: gathered inside, grads come back sharded
        mesh = init_device_mesh("cpu", (world,))
        c_dt = distribute_tensor(c.clone(), mesh, [Shard(0)]).requires_grad_()
        e1 = e.clone().requires_grad_()
        linear_cross_entropy(e1, c_dt, t, **opts).backward()
        results["dtensor"] = (e1.grad, c_dt.grad.full_tensor())
        # (2) vocab-parallel: this rank holds a contiguous slice (torch.chunk split: 66 / 65 rows)
        sl = torch.chunk(torch.arange(V), world)[rank]
        for impl in ("torch", "triton"):
            c_loc = c[sl].clone().requires_grad_()
            e2 = e.clone().requires_grad_()
            loss = linear_cross_entropy(e2, c_loc, t, vocab_parallel_group=dist.group.WORLD, impl=impl,
                                        filter_eps=None, **opts)
            loss.backward()
            results[f"vp_{impl}"] = (loss.detach(), e2.grad, c_loc.grad)  # the parent joins the dC slices
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_dtensor_weight_and_vocab_parallel_match_single_process(tmp_path):
    spawn(_worker, (2, _free_port(), str(tmp_path)), 2)
    e, c, t = make_inputs(N, V, D, "peaked", seed=1, ignore_every=3)
    opts = {"softcap": 5.0, "label_smoothing": 0.1, "z_loss": 1e-3}
    gt = run_with_grads(lambda e_, c_, b_: reference(e_, c_, t, **opts), e.double(), c.double())
    res_all = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for res in res_all:
        de, dc = res["dtensor"]
        torch.testing.assert_close(de.double(), gt["de"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(dc.double(), gt["dc"], rtol=1e-4, atol=1e-6)
        for impl in ("torch", "triton"):
            loss, de, _ = res[f"vp_{impl}"]
            dc = torch.cat([r[f"vp_{impl}"][2] for r in res_all])
            torch.testing.assert_close(loss.double(), gt["loss"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(de.double(), gt["de"], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(dc.double(), gt["dc"], rtol=1e-4, atol=1e-6)
