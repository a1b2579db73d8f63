"""FSDP2 sharding of NF4 weights on CPU over gloo, 2 processes: each rank holds half of the PACKED data, the
all-gather extension rebuilds the full NF4 weight, and forward/backward equal the unsharded model's."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from memfit.quant import NF4Tensor
from spawn import shard_mlp_pair, spawn

WORLD = 2


def build(double_quant: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 8))
    for lin in (model[0], model[2]):  # frozen NF4 base layers; the head stays dense and trainable
        lin.weight = nn.Parameter(NF4Tensor.from_dense(lin.weight.data, double_quant=double_quant), requires_grad=False)
    return model


def worker(rank: int, init_file: str, double_quant: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        ref, model = shard_mlp_pair(build, WORLD, double_quant)
        local = model[0].weight.to_local()
        full = ref[0].weight
        assert isinstance(local, NF4Tensor) and local.shape == (128, 128)
        assert local.packed.numel() == full.packed.numel() // WORLD  # half of the packed codes, not a dense copy
        rows = slice(rank * 128, (rank + 1) * 128)
        assert torch.equal(local.dequantize(), full.dequantize()[rows])
        for step in range(2):  # the second all-gather reuses the unsharded buffers (`out=` path)
            x = torch.randn(4, 128, generator=torch.Generator().manual_seed(step))
            y = model(x)
            y_ref = ref(x)
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
            y.square().sum().backward()
            y_ref.square().sum().backward()
            g = model[4].weight.grad.full_tensor()
            torch.testing.assert_close(g, ref[4].weight.grad, atol=1e-4, rtol=1e-5)
            model.zero_grad()
            ref.zero_grad()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("double_quant", [False, True])
def test_fsdp2_gloo_two_process_sharding(tmp_path, double_quant, monkeypatch):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with gloo is required for the FSDP2 test")
    monkeypatch.setenv("MASTER_ADDR", os.environ.get("MASTER_ADDR", "127.0.0.1"))  # for the spawned workers
    spawn(worker, (str(tmp_path / "init"), double_quant), WORLD)


def test_unaligned_shard_is_a_clear_error():
    t = NF4Tensor.from_dense(torch.randn(6, 40))  # rows of 40: a 3-row shard ends mid-block
    with pytest.raises(NotImplementedError, match="multiples of 64"):
        torch.chunk(t, 2, dim=0)
    halves = torch.chunk(NF4Tensor.from_dense(torch.randn(4, 64)), 2, dim=0)
    assert [h.shape for h in halves] == [torch.Size([2, 64])] * 2
