"""FSDP2 sharding of NeuZip weights on CPU over gloo, 2 processes: each rank keeps its rows COMPRESSED, the
all-gather extension moves compressed parts (padded to one size) and decodes them, and forward/backward are bit-exact
with the unsharded model; 1 process too (FSDP2 then copies only the first all-gather input); also the ops FSDP2 uses
(split, new_zeros, narrow + copy_, view) on their own."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from memfit.quant import NeuZipTensor
from spawn import shard_mlp_pair, spawn


def build(mantissa_bits: int | None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 8))
    model = model.to(torch.bfloat16)
    for lin in (model[0], model[2]):  # frozen NeuZip base layers; the head stays dense and trainable
        lin.weight = nn.Parameter(NeuZipTensor.from_dense(lin.weight.data, mantissa_bits, symbols_per_lane=256),
                                  requires_grad=False)
    return model


def worker(rank: int, world: int, init_file: str, mantissa_bits: int | None) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ref, model = shard_mlp_pair(build, world, mantissa_bits)
        local = model[0].weight.to_local()
        full = ref[0].weight
        n = 256 // world
        assert isinstance(local, NeuZipTensor) and local.shape == (n, 128)
        assert local.compressed_nbytes < 0.8 * local.numel() * 2  # a compressed shard, not a dense copy
        rows = slice(rank * n, (rank + 1) * n)
        assert torch.equal(local.dequantize().view(torch.int16), full.dequantize()[rows].view(torch.int16))
        for step in range(2):  # the second all-gather refills the unsharded buffer (`out=` path)
            x = torch.randn(4, 128, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
            y = model(x)
            y_ref = ref(x)
            assert torch.equal(y, y_ref)
            y.float().square().sum().backward()
            y_ref.float().square().sum().backward()
            assert torch.equal(model[4].weight.grad.full_tensor(), ref[4].weight.grad)
            model.zero_grad()
            ref.zero_grad()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,mantissa_bits", [(2, None), (2, 3), (1, None)])
def test_fsdp2_gloo_sharding(tmp_path, world, mantissa_bits, monkeypatch):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with gloo is required for the FSDP2 test")
    monkeypatch.setenv("MASTER_ADDR", os.environ.get("MASTER_ADDR", "127.0.0.1"))  # for the spawned workers
    spawn(worker, (world, str(tmp_path / "init"), mantissa_bits), world)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def test_fsdp_sharding_ops_share_the_store():
    w = (torch.randn(6, 40) * 0.1).to(torch.bfloat16)
    z = NeuZipTensor.from_dense(w, symbols_per_lane=8)
    chunks = torch.chunk(z, 2, dim=0)  # what FSDP2's _chunk_with_empty does
    assert all(isinstance(c, NeuZipTensor) for c in chunks)
    assert chunks[0].fsdp_pad_to == chunks[1].fsdp_pad_to == max(c.enc.words.numel() for c in chunks)
    for c, ref in zip(chunks, torch.chunk(w, 2, dim=0)):
        assert torch.equal(_bits(c.dequantize()), _bits(ref))
    padded = z.new_zeros(chunks[1].shape)
    assert isinstance(padded, NeuZipTensor) and not padded.dequantize().any()
    flat = padded.view(-1)  # FSDP keeps this view and later all-gathers through a narrow() of the same tensor
    padded.narrow(0, 0, 3).copy_(chunks[1])
    assert torch.equal(_bits(flat.dequantize().view(3, 40)), _bits(w[3:]))
    assert flat.fsdp_pad_to == chunks[1].fsdp_pad_to
    part = z[1:4]  # a proper row range is an independent re-encoded copy
    assert isinstance(part, NeuZipTensor) and torch.equal(_bits(part.dequantize()), _bits(w[1:4]))
    lossy = NeuZipTensor.from_dense(w.float(), 1, block=40)
    halves = torch.chunk(lossy, 2, dim=0)
    assert torch.equal(torch.cat([h.dequantize() for h in halves]), lossy.dequantize())
    with pytest.raises(NotImplementedError, match="block"):
        torch.chunk(NeuZipTensor.from_dense(w.float(), 1, block=80), 2, dim=0)
