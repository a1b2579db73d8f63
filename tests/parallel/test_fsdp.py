"""FSDP2 on CPU over gloo: the wrapping policy (in-process, one rank), and 1 process vs 2 processes end to end
(same per-step global losses, consolidated weights equal, adapters exported as full tensors)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import MODEL_FAST, ROOT


@pytest.fixture
def one_rank():
    """A single-rank gloo process group and its 1-D CPU mesh (torn down after the test)."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float().train()


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    from memfit.loss import TorchCrossEntropy

    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    return TorchCrossEntropy()(hidden, model.lm_head.weight, ids, shift=1)


class NoHooks(torch.Tensor):
    """A storage-like tensor subclass without FSDP2 all-gather hooks."""


def test_policy_units_mixed_precision_and_exact_loss(one_rank):
    from torch.distributed.fsdp import FSDPModule

    from memfit.parallel.fsdp import ShardedRoot, shard_model

    model = tiny_llama()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    expected = loss_of(ref, ids)
    expected.backward()

    root = shard_model(model, one_rank, param_dtype=None, reduce_dtype="float32", activation_checkpointing=True)
    assert isinstance(root, ShardedRoot) and isinstance(root, FSDPModule)
    units = {n for n, m in model.named_modules() if isinstance(m, FSDPModule)}
    assert {"model.layers.0", "model.layers.1", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"} <= units
    assert "lm_head" not in units and "model.embed_tokens" not in units  # read directly by the loss: root unit
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert all(hasattr(p, "full_tensor") for p in model.parameters())  # every parameter is a DTensor shard

    got = root(loss_of, model, ids)
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_compute_fp32_master_weights(one_rank):
    from memfit.parallel.fsdp import shard_model

    model = tiny_llama()
    seen: list[torch.dtype] = []
    model.model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    root = shard_model(model, one_rank, param_dtype="bfloat16", reduce_dtype="float32")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    root(loss_of, model, ids).backward()
    assert seen == [torch.bfloat16]  # gathered for compute in bf16
    w = model.model.layers[0].mlp.up_proj.weight
    assert w.dtype == torch.float32 and w.grad.dtype == torch.float32  # fp32 master weights and reduced grads


def test_frozen_subclasses_stay_compressed(one_rank):
    from memfit.parallel.fsdp import shard_model
    from memfit.quant.nf4 import NF4Tensor

    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    lin = model.model.layers[0].mlp.gate_proj
    dense = lin.weight.detach().clone()
    lin.weight = nn.Parameter(NF4Tensor.from_dense(dense), requires_grad=False)
    odd = model.model.layers[1].mlp.gate_proj
    odd.weight = nn.Parameter(odd.weight.detach().as_subclass(NoHooks), requires_grad=False)
    odd_before = odd.weight
    model.lm_head.weight.requires_grad_(True)

    shard_model(model, one_rank, param_dtype=None)
    local = lin.weight.to_local()
    assert isinstance(local, NF4Tensor)  # the shard is still packed NF4, not a dense copy
    assert local.packed.dtype == torch.uint8 and local.packed.numel() == dense.numel() // 2
    assert odd.weight is odd_before and type(odd.weight) is NoHooks  # no hooks: left out of sharding, untouched


def test_bad_options_are_named():
    from memfit.parallel.fsdp import FSDP2Strategy

    with pytest.raises(ValueError, match="strategy.param_dtype='fp8' is not a valid option"):
        FSDP2Strategy(param_dtype="fp8")


# --------------------------------------------------------------------------------------------------- end to end
TEXT = ["data=text", "data.max_length=32", "data.n_docs=60", "data.tasks=[boolean_expressions]",
        "trainer.max_steps=4", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.accelerator=cpu",
        "eval.before=false", "eval.test=false", "print_summary=false", "logger=none", "callbacks=default",
        "callbacks.progress=null", "callbacks.lr_monitor=null", "callbacks.monitor=null",
        "callbacks.model_checkpoint.every_n_train_steps=4", "trainer=fsdp", "trainer.strategy.param_dtype=none"]


def train_fsdp(out, devices: int, batch: int, *extra: str) -> list[float]:
    cmd = [sys.executable, "-m", "memfit.train", *MODEL_FAST, *TEXT, f"trainer.devices={devices}",
           f"data.batch_size={batch}", f"hydra.run.dir={out}", f"paths.output_dir={out}",
           f"paths.cache_dir={out.parent}/cache", "+callbacks.losslog._target_=memfit.callbacks.monitor.LossLog",
           f"+callbacks.losslog.path={out}/loss.jsonl", *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    return [r["loss"] for r in rows]


def test_two_processes_match_one(tmp_path):
    """Global batch 8: one rank x 8 vs two ranks x 4 (gloo; plus activation checkpointing, which must not change the
    math). Same per-step loss, same final weights after consolidation, trainable export = consolidated weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    one = train_fsdp(tmp_path / "one", 1, 8)
    two = train_fsdp(tmp_path / "two", 2, 4, "model.activation_checkpointing=true")
    assert one[-1] < one[0]  # it trained
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)

    models = []
    for run in ("one", "two"):
        ckpt = tmp_path / run / "checkpoints" / "last.ckpt"
        assert (ckpt / ".metadata").is_file()  # sharded (DCP) checkpoint directory
        out = subprocess.run([sys.executable, "-m", "memfit.cli.consolidate", str(ckpt), str(tmp_path / f"hf_{run}")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        models.append(AutoModelForCausalLM.from_pretrained(tmp_path / f"hf_{run}").state_dict())
    assert len(list((tmp_path / "two").glob("checkpoints/last.ckpt/*.distcp"))) == 2  # one shard file per rank
    exported = load_file(tmp_path / "two" / "trainable.safetensors")
    assert set(exported) == set(models[1])  # full fine-tuning: every tensor is trainable
    for name, t in exported.items():
        assert torch.equal(t, models[1][name]), name  # rank-0 full tensors == consolidated checkpoint
        torch.testing.assert_close(models[0][name], t, rtol=1e-4, atol=1e-5, msg=name)  # 1 rank vs 2 ranks
