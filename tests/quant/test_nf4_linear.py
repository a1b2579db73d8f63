"""NF4 weights in use: F.linear forward/backward, `.to`, `apply_nf4` on a causal LM (forward + greedy generation),
checkpoint size (~4x smaller than bf16), and `storage=nf4` training through `memfit.train.run`."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memfit.quant import NF4Tensor, apply_storage
from memfit.quant.nf4_apply import apply_nf4, nf4_targets
from rounding import assert_within, matmul_bound, unit_roundoff


def frozen_nf4(w: torch.Tensor, **kw) -> nn.Parameter:
    return nn.Parameter(NF4Tensor.from_dense(w, **kw), requires_grad=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_linear_forward_backward_matches_dense_dequantized(dtype, double_quant):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g).to(dtype)
    q = NF4Tensor.from_dense(w, double_quant=double_quant)
    wd = q.dequantize().double()  # the reference: the same stored weight, dense, in float64
    x = torch.randn(2, 5, 80, generator=g).to(dtype).requires_grad_(True)
    bias = torch.randn(48, generator=g).to(dtype).requires_grad_(True)
    y = F.linear(x, q, bias)
    gy = torch.randn(2, 5, 48, generator=g).to(dtype)
    y.backward(gy)
    x64 = x.detach().double().requires_grad_(True)
    b64 = bias.detach().double().requires_grad_(True)
    y64 = F.linear(x64, wd, b64)
    y64.backward(gy.double())
    assert y.dtype == dtype and y.shape == (2, 5, 48)
    # rounding bounds (tests/helpers/rounding.py): the bias as one more term of the product ([x, 1] @ [W^T; b]) plus one more
    # rounding of the sum; x.grad = gy @ W over 48 terms; bias.grad = a 10-term sum of gy
    x2, gy2 = x.detach().reshape(10, 80), gy.reshape(10, 48)
    xa, wa = torch.cat([x2, torch.ones(10, 1, dtype=dtype)], 1), torch.cat([wd.t(), b64.detach()[None]], 0)
    y_ref, gx_ref = y64.detach().reshape(10, 48), x64.grad.reshape(10, 80)
    y_bound = matmul_bound(xa, wa, y_ref, dtype) + unit_roundoff(dtype) * (xa.double().abs() @ wa.abs())
    assert_within(y.reshape(10, 48), y_ref, y_bound, "y")
    assert_within(x.grad.reshape(10, 80), gx_ref, matmul_bound(gy2, wd, gx_ref, dtype), "x.grad")
    ones = torch.ones(1, 10, dtype=torch.float64)
    assert_within(bias.grad[None], b64.grad[None], matmul_bound(ones, gy2, b64.grad[None], dtype), "bias.grad")


def test_linear_under_cpu_autocast_runs_in_bf16():
    w = torch.randn(16, 32)
    q = NF4Tensor.from_dense(w)
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.linear(x, q)
    assert y.dtype == torch.bfloat16
    xb, wb = x.detach().bfloat16(), q.dequantize(torch.bfloat16).double()  # what autocast computes with
    ref = xb.double() @ wb.t()
    assert_within(y, ref, matmul_bound(xb, wb.t(), ref, torch.bfloat16), "y")
    y.float().sum().backward()
    ones = torch.ones(4, 16, dtype=torch.float64)
    gref = ones @ wb  # x.grad = ones @ W in bf16, widened to x's fp32
    assert_within(x.grad, gref, matmul_bound(ones, wb, gref, torch.bfloat16), "x.grad")


def test_linear_refuses_trainable_weight_and_wrong_width():
    q = NF4Tensor.from_dense(torch.randn(8, 16))
    with pytest.raises(ValueError, match="16"):
        F.linear(torch.randn(2, 15), q)
    with pytest.raises(RuntimeError, match="frozen"):
        F.linear(torch.randn(2, 16), nn.Parameter(q, requires_grad=True))


def test_module_to_dtype_keeps_packed_form_and_fallback_ops():
    lin = nn.Linear(64, 32)
    lin.weight = frozen_nf4(lin.weight.data)
    packed = lin.weight.packed.clone()
    lin.to(torch.bfloat16)
    assert isinstance(lin.weight, NF4Tensor) and lin.weight.dtype == torch.bfloat16
    assert torch.equal(lin.weight.packed, packed)  # the codes do not change: dequantize just targets bf16
    # ops without a packed implementation compute on the dequantized tensor
    torch.testing.assert_close(lin.weight.t() @ torch.ones(32, dtype=torch.bfloat16),
                               lin.weight.dequantize().t() @ torch.ones(32, dtype=torch.bfloat16))


def tiny_llama(tie: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


def dequantized_copy(model: nn.Module) -> nn.Module:
    """Reference: the same model with every NF4 weight replaced by its dense dequantization."""
    ref = copy.deepcopy(model)
    for mod in ref.modules():
        if isinstance(getattr(mod, "weight", None), NF4Tensor):
            mod.weight = nn.Parameter(mod.weight.dequantize(), requires_grad=False)
    return ref


def test_apply_nf4_converts_frozen_linears_and_generation_matches_reference():
    model = tiny_llama()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    apply_storage(model, {"name": "nf4", "block_size": 64})
    nf4 = [n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), NF4Tensor)]
    assert len(nf4) == n_linear - 1 and "lm_head" not in nf4  # lm_head and embeddings stay dense by default
    assert not isinstance(model.model.embed_tokens.weight, NF4Tensor)
    ref = dequantized_copy(model)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out_ref = ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, out_ref)


def test_tied_and_trainable_weights():
    model = tiny_llama(tie=True)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    # tied embed/lm_head: converted only when both are included, and then stays one shared tensor
    assert "lm_head" not in nf4_targets(model, include_lm_head=True, include_embeddings=False)
    apply_nf4(model, {"include_lm_head": True, "include_embeddings": True, "double_quant": True})
    assert isinstance(model.lm_head.weight, NF4Tensor) and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.double_quant
    assert not isinstance(model.model.layers[0].mlp.up_proj.weight, NF4Tensor)  # trainable stays dense
    ids = torch.randint(0, 96, (1, 5))
    torch.testing.assert_close(model(ids).logits, dequantized_copy(model)(ids).logits, atol=1e-5, rtol=1e-5)


def _saved_bytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return len(buf.getvalue())


@pytest.mark.parametrize("double_quant,min_ratio", [(False, 3.4), (True, 3.75)])
def test_checkpoint_is_about_4x_smaller_than_bf16(double_quant, min_ratio):
    """bf16: 16 bit/weight; NF4: 4 + 32/64 = 4.5 (3.56x); with double quant 4 + 8/64 + 32/16384 = 4.127 (3.88x)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512, bias=False) for _ in range(4)]).to(torch.bfloat16).requires_grad_(False)
    dense_bytes = _saved_bytes(model.state_dict())
    apply_nf4(model, {"double_quant": double_quant})
    sd = model.state_dict()
    assert all(isinstance(v, NF4Tensor) for v in sd.values())
    ratio = dense_bytes / _saved_bytes(sd)
    assert min_ratio < ratio < 4.0, ratio


def test_storage_nf4_trains_lora_and_checkpoints_packed(fast_cfg, tmp_path):
    from memfit.train import run

    cfg = fast_cfg("adapter=lora", "storage=nf4", "trainer.max_steps=3", "eval.test=true", "data.n_test=4",
                   "callbacks=default", "~callbacks.progress", "~callbacks.lr_monitor",
                   "callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.model_checkpoint.save_top_k=-1")
    res = run(cfg)
    assert 0 < res["after"]["test/loss"] < 20  # generation-based test epoch ran on the NF4 model
    assert res["trainable_params"] < res["total_params"]
    ckpts = sorted((tmp_path / "out").rglob("*.ckpt"))
    assert ckpts, "no checkpoint written"
    sd = torch.load(ckpts[-1], map_location="cpu", weights_only=True)["state_dict"]
    packed = {k: v for k, v in sd.items() if isinstance(v, NF4Tensor)}
    assert packed and all(k.endswith("base_layer.weight") for k in packed)
    lora_b = [v for k, v in sd.items() if k.endswith("lora_B")]
    assert lora_b and not any(isinstance(v, NF4Tensor) for v in lora_b)
    assert all(v.abs().sum() > 0 for v in lora_b)  # B starts at 0: the adapters trained through the NF4 base
