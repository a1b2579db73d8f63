"""NF4 on the GPU (run with `-m gpu`): Triton dequantize vs the pure-torch reference at real sizes, F.linear
forward/backward, and a quantized causal LM's greedy generation vs its dequantized twin. Products are checked
elementwise against float64 on the same dequantized weight within tests/helpers/rounding.py's bound (fp32 accumulation over K,
the output's round-to-nearest): the GPU's bf16 tl.dot and casts, which the CPU interpreter cannot run as such."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memfit.kernels.nf4 import dequantize_nf4_reference, dequantize_nf4_triton, quantize_nf4
from memfit.quant import NF4Tensor
from rounding import assert_within, matmul_bound

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
    x2, gy2 = x.detach().reshape(-1, 512), gy.reshape(-1, 1024)
    y64, gx64 = x2.double() @ wd.t(), gy2.double() @ wd
    print("fwd", assert_within(y.reshape(-1, 1024), y64, matmul_bound(x2, wd.t(), y64, y.dtype), "forward"),
          "bwd", assert_within(x.grad.reshape(-1, 512), gx64, matmul_bound(gy2, wd, gx64, y.dtype), "backward"))


def test_nf4_model_generation_on_cuda():
    from transformers import LlamaConfig, LlamaForCausalLM

    from memfit.quant.nf4_apply import apply_nf4

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


@pytest.mark.parametrize("n,k,m,double_quant", [(4096, 14336, 1, False), (4096, 14336, 33, False),
                                                 (1000, 38, 5, True), (1000, 38, 33, True), (384, 640, 1, True),
                                                 (384, 640, 7, True)])
def test_fused_matmul_matches_float64_on_cuda(n, k, m, double_quant):
    """Fused dequant-GEMM (both directions, split-K and not) vs a float64 product on the dequantized weight."""
    from memfit.kernels.nf4.matmul import _WS, MMConfig, nf4_matmul
    from memfit.quant.nf4_double import dynamic_code

    q = NF4Tensor.from_dense(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), double_quant=double_quant)
    wd = q.dequantize().double()
    code8 = dynamic_code("cuda") if double_quant else None
    for trans in (False, True):
        a = torch.randn(m, n if trans else k, device="cuda", dtype=torch.bfloat16)
        ref = a.double() @ wd if trans else a.double() @ wd.t()
        bound = matmul_bound(a, wd if trans else wd.t(), ref, a.dtype)
        cfgs = [MMConfig(64, 128, 1), MMConfig(32, 64, 8)]
        if k % 64 == 0:  # one scale load per block: the blocked tl.dot variant, and the tensor-core-free kernels
            cfgs += [MMConfig(64, 128, 1, blocked=True), MMConfig(32, 64, 4, 8, blocked=True),
                     MMConfig(64, 128, 2, blocked=True, pairs=True)]
            if m <= (1 if trans else 16):
                cfgs += [MMConfig(8, 256, 1, gemv=True), MMConfig(32, 64, 4, gemv=True),
                         MMConfig(4, 1024, 2, gemv=True), MMConfig(8, 512, 4, gemv=True),  # wide tiles
                         MMConfig(8, 256, 2, gemv=True, pairs=True)]
        for cfg in cfgs:
            outs = []
            for _ in range(2):  # the second call runs on the tile counters the first one must have reset
                out = torch.full_like(ref, float("nan"), dtype=torch.bfloat16)  # poison the allocator's next block
                del out
                out = nf4_matmul(a, q.packed, q.scale_tensors(), q.offset, n, k, 64, trans, code8, cfg)
                assert out.shape == ref.shape
                assert_within(out, ref, bound, f"trans={trans} {cfg}")
                outs.append(out)
            assert torch.equal(outs[0], outs[1]), (trans, cfg)  # deterministic split-K
    torch.cuda.synchronize()
    (_ws, lock), = _WS.values()
    assert not lock.any()


@pytest.mark.parametrize("m", [1, 16, 4096])
def test_linear_dispatch_fwd_bwd_on_cuda(m):
    """F.linear picks the fused kernel (autotuned on first use) for few rows, dequantize + cuBLAS for many."""
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    q = NF4Tensor.from_dense(w)
    wd = q.dequantize().double()
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y0 = F.linear(x, q)
    y = F.linear(x, q)
    y.backward(gy)
    y64, gx64 = x.detach().double() @ wd.t(), gy.double() @ wd
    assert torch.equal(y0, y.detach())
    assert_within(y, y64, matmul_bound(x.detach(), wd.t(), y64, y.dtype), "forward")
    assert_within(x.grad, gx64, matmul_bound(gy, wd, gx64, y.dtype), "backward")


@pytest.mark.parametrize("double_quant", [False, True])
def test_fast_launch_equals_triton_launch_on_cuda(monkeypatch, double_quant):
    """kernels/launch.Fast (compiled-kernel reuse) gives bit-identical results to Triton's own launch path for every
    fused-kernel kind, with aligned and misaligned inputs and shapes alternating (new specialisations, then reuse)."""
    from memfit.kernels.nf4.matmul import MMConfig, nf4_matmul
    from memfit.kernels.settings import SETTINGS
    from memfit.quant.nf4_double import dynamic_code

    cases = []
    for n, k in ((4096, 4096), (1000, 640)):
        q = NF4Tensor.from_dense(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), double_quant=double_quant)
        for trans, m, cfg in ((False, 1, MMConfig(16, 256, 2, gemv=True)), (True, 1, MMConfig(16, 128, 4, gemv=True)),
                              (False, 7, MMConfig(64, 128, 4, blocked=True)), (True, 7, MMConfig(64, 128, 1)),
                              (False, 3, MMConfig(32, 64, 1))):
            width = n if trans else k
            big = torch.randn(m * width + 1, device="cuda", dtype=torch.bfloat16)
            for a in (big[:-1].view(m, width), big[1:].view(m, width)):  # 16-byte aligned, then 2 bytes off
                cases.append((a, q, n, k, trans, cfg))
    code8 = dynamic_code("cuda") if double_quant else None

    def run_all() -> list[torch.Tensor]:
        return [nf4_matmul(a, q.packed, q.scale_tensors(), q.offset, n, k, 64, trans, code8, cfg)
                for a, q, n, k, trans, cfg in cases]

    monkeypatch.setattr(SETTINGS, "fast_launch", False)
    ref = run_all()
    monkeypatch.setattr(SETTINGS, "fast_launch", True)
    for _ in range(3):  # first pass compiles or finds each specialisation, later passes reuse them
        got = run_all()
        assert all(torch.equal(g, r) for g, r in zip(got, ref))
    torch.cuda.synchronize()
    from memfit.kernels.nf4 import matmul as nm

    # the compiled kernels were kept, so passes 2 and 3 went through them, not through Triton's binder
    assert nm._GEMV.cache and nm._GEMV_T.cache and nm._MM.cache
