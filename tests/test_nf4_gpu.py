"""NF4 on the GPU (run with `-m gpu`): Triton dequantize vs the pure-torch reference at real sizes, F.linear
forward/backward, and a quantized causal LM's greedy generation vs its dequantized twin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from framework.quant import NF4Tensor
from kernels.nf4 import dequantize_nf4_reference, dequantize_nf4_triton, quantize_nf4

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (1000, 37)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_dequantize_equals_reference_on_cuda(shape, dtype):
    x = torch.randn(*shape, device="cuda").to(dtype)
    packed, absmax = quantize_nf4(x, 64)
    assert torch.equal(dequantize_nf4_triton(packed, absmax, shape, 64, dtype),
                       dequantize_nf4_reference(packed, absmax, shape, 64, dtype))


def test_quantize_on_cuda_equals_cpu():
    x = torch.randn(2048, 1536, dtype=torch.bfloat16)
    pc, ac = quantize_nf4(x, 64)
    pg, ag = quantize_nf4(x.cuda(), 64)
    assert torch.equal(pc, pg.cpu()) and torch.equal(ac, ag.cpu())


def test_linear_fwd_bwd_on_cuda():
    w = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16)
    q = NF4Tensor.from_dense(w, double_quant=True)
    x = torch.randn(3, 7, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(3, 7, 1024, device="cuda", dtype=torch.bfloat16)
    y = F.linear(x, q)
    y.backward(gy)
    wd = q.dequantize().double()  # reference: the same stored weight, dense, float64
    y64, gx64 = x.detach().double() @ wd.t(), gy.double() @ wd
    # bf16 outputs of K=512 / K=1024 dot products: compare at bf16 resolution of the output scale
    torch.testing.assert_close(y.double(), y64, atol=1e-2 * y64.abs().max().item(), rtol=1e-2)
    torch.testing.assert_close(x.grad.double(), gx64, atol=1e-2 * gx64.abs().max().item(), rtol=1e-2)


def test_nf4_model_generation_on_cuda():
    from transformers import LlamaConfig, LlamaForCausalLM

    from framework.quant.nf4_apply import apply_nf4

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).cuda().eval().requires_grad_(False)
    apply_nf4(model, {"block_size": 64})
    ref = LlamaForCausalLM(cfg).cuda().eval()
    ref.load_state_dict({k: (v.dequantize() if isinstance(v, NF4Tensor) else v) for k, v in model.state_dict().items()})
    ids = torch.randint(0, 128, (2, 6), device="cuda")
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0),
                       ref.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0))
