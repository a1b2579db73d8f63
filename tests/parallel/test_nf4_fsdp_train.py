"""Training THROUGH an FSDP2-sharded NF4 weight with bf16 mixed precision (param_dtype=bfloat16, fp32 reduce), on
CPU over gloo, 1 and 2 processes: per-step global losses and the trained weights match an unsharded dense reference.

Why: `test_nf4_fsdp` checks forward/backward in fp32 on 2 ranks only. On a 1-rank mesh FSDP2 skips the collective and
copies only the first all-gather input, which broke `NF4Tensor.fsdp_post_all_gather` on the first forward (the
`scaling --worlds 1,2` smoke run). The reference here is plain torch on the dequantized weight (taken before sharding)
with explicit bf16 casts, so it shares no code with FSDP2 or the NF4 all-gather hooks.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from memfit.quant import NF4Tensor
from spawn import spawn

BATCH, STEPS, LR = 8, 2, 0.5
BF16 = torch.bfloat16


def build(double_quant: bool) -> nn.Sequential:
    """Trainable Linear -> frozen NF4 Linear (trainable bias) -> ReLU -> trainable head: gradients of the first
    layer flow through the NF4 weight's backward. 256 x 128 NF4 rows shard on 64- and 256x64-element boundaries."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 8))
    nf4 = model[1]
    nf4.weight = nn.Parameter(NF4Tensor.from_dense(nf4.weight.data, double_quant=double_quant), requires_grad=False)
    return model


def reference(model: nn.Sequential, batches: list[torch.Tensor],
              world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Unsharded dense data-parallel reference: fp32 master weights, bf16 compute (each weight cast to bf16) on each of
    `world` slices of the batch, fp32 loss, slice gradients averaged in fp32 (what FSDP2's fp32 reduce does), SGD."""
    w_nf4 = model[1].weight.dequantize(BF16)  # the frozen weight, dense, taken before any sharding
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(list(params.values()), lr=LR)
    losses = []
    for batch in batches:
        slice_losses = []
        for x in batch.chunk(world):
            h = F.linear(x.to(BF16), params["0.weight"].to(BF16), params["0.bias"].to(BF16))
            h = F.relu(F.linear(h, w_nf4) + params["1.bias"].to(BF16))  # bias added after the matmul, as NF4 does
            y = F.linear(h, params["3.weight"].to(BF16), params["3.bias"].to(BF16))
            slice_losses.append(y.float().square().mean())
        loss = torch.stack(slice_losses).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in params.items()}


def worker(rank: int, world: int, init_file: str, double_quant: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randn(BATCH, 32, generator=gen) for _ in range(STEPS)]  # the same global batches everywhere
        ref_losses, ref_params = reference(build(double_quant), batches, world)
        init = {n: p.detach().clone() for n, p in build(double_quant).named_parameters() if p.requires_grad}

        model = build(double_quant)
        full_packed = model[1].weight.packed.numel()
        mesh = init_device_mesh("cpu", (world,))
        policy = MixedPrecisionPolicy(param_dtype=BF16, reduce_dtype=torch.float32)
        for layer in (model[0], model[1], model[3]):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        local = model[1].weight.to_local()
        assert isinstance(local, NF4Tensor) and local.packed.numel() == full_packed // world  # packed per shard
        seen: list[tuple[type, torch.dtype]] = []
        model[1].register_forward_pre_hook(lambda m, a: seen.append((type(m.weight), m.weight.dtype)))

        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)  # each rank its slice of the global batch
        losses = []
        for x in batches:
            loss = model(x[rows]).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)

        assert seen == [(NF4Tensor, BF16)] * STEPS  # gathered still packed NF4, dequantized to bf16 for compute
        assert losses[1] < 0.8 * losses[0]  # it trains (so the weight comparison below is not vacuous)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7)
        for name, p in model.named_parameters():
            if p.requires_grad:
                got = p.detach().full_tensor()
                assert got.dtype == torch.float32  # fp32 master weights
                assert (ref_params[name] - init[name]).abs().max() > 1e-3, name  # the weight moved
                torch.testing.assert_close(got, ref_params[name], rtol=1e-5, atol=1e-7, msg=name)
        assert torch.equal(model[1].weight.to_local().packed, local.packed)  # the frozen shard is untouched
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("world", "double_quant"), [(1, False), (1, True), (2, False), (2, True)])
def test_fsdp2_bf16_training_through_nf4_matches_unsharded(tmp_path, world, double_quant, monkeypatch):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with gloo is required for the FSDP2 test")
    monkeypatch.setenv("MASTER_ADDR", os.environ.get("MASTER_ADDR", "127.0.0.1"))  # for the spawned workers
    spawn(worker, (world, str(tmp_path / "init"), double_quant), world)
