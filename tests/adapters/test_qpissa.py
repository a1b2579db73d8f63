"""QPiSSA / LoftQ / QLoRA inits against the NF4 storage: recipe vs an independent float64 reference, T=1 == PiSSA then
quantize, the error-reduction ordering on a decaying spectrum, the storage layout of the quantizer, end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from memfit.adapters import AdapterSpec, adapter_layers, apply_adapter, nf4_quantizer
from memfit.adapters.error import init_error_reduction
from memfit.adapters.inject import inject
from memfit.quant import NF4Tensor

NF4 = {"name": "nf4", "block_size": 64, "double_quant": False}


def nf4_deq(w: torch.Tensor) -> torch.Tensor:
    return NF4Tensor.from_dense(w.float().contiguous(), block_size=64).dequantize().double()


def nuc(x: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(x.double()).sum())


def decaying(m: int, n: int, seed: int = 0, decay: float = 0.9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = decay ** torch.arange(min(m, n), dtype=torch.float64)
    return ((u * s) @ v.T).float()


def svd_r(x: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def reference_qpissa(w: torch.Tensor, r: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's recipe written out in float64: (L R, frozen base before quantization)."""
    w = w.double()
    res = w
    for _ in range(iters):
        lr = svd_r(res, r)
        res = w - nf4_deq(w - lr)
    return lr, w - lr


def reference_loftq(w: torch.Tensor, r: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.double()
    base = w
    for _ in range(iters):
        lr = svd_r(w - nf4_deq(base), r)
        prev, base = base, w - lr
    return lr, prev


def ratio(w: torch.Tensor, lr: torch.Tensor, base: torch.Tensor) -> float:
    w = w.double()
    return (1 - nuc(w - nf4_deq(base) - lr) / nuc(w - nf4_deq(w))) * 100


def quant_layer(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def run_init(w: torch.Tensor, init: str, r: int, iters: int, alpha: float | None = None) -> nn.Module:
    model = nn.Sequential()
    model.add_module("proj", quant_layer(w))
    spec = AdapterSpec(init=init, rank=r, alpha=alpha or r, targets=["proj"], iters=iters, progress=False)
    inject(model, spec, nf4_quantizer(NF4))
    return model.proj


@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("alpha", [None, 32.0])
def test_qpissa_matches_float64_recipe(iters, alpha):
    w = decaying(96, 64, seed=1)
    r = 8
    lay = run_init(w, "pissa", r, iters, alpha)
    lr_ref, base_ref = reference_qpissa(w, r, iters)
    assert torch.allclose(lay.delta().double(), lr_ref, atol=2e-5, rtol=0)
    assert torch.allclose(lay.base_layer.weight.double(), base_ref, atol=2e-5, rtol=0)
    assert lay.init_meta["init"] == "qpissa" and lay.init_meta["iters"] == iters


def test_qpissa_one_iteration_is_pissa_then_quantize():
    w = decaying(64, 64, seed=2)
    q1 = run_init(w, "pissa", 8, 1)
    model = nn.Sequential()
    model.add_module("proj", quant_layer(w))
    inject(model, AdapterSpec(init="pissa", rank=8, alpha=8, targets=["proj"], progress=False))  # dense PiSSA
    assert torch.equal(q1.base_layer.weight, model.proj.base_layer.weight)
    assert torch.equal(q1.lora_A, model.proj.lora_A) and torch.equal(q1.lora_B, model.proj.lora_B)


def test_loftq_matches_float64_recipe():
    w = decaying(96, 64, seed=3)
    lay = run_init(w, "loftq", 8, 3)
    lr_ref, base_ref = reference_loftq(w, 8, 3)
    assert torch.allclose(lay.delta().double(), lr_ref, atol=2e-5, rtol=0)
    assert torch.allclose(lay.base_layer.weight.double(), base_ref, atol=2e-5, rtol=0)


def test_error_reduction_ordering_on_decaying_spectrum():
    """QLoRA 0 < LoftQ-1 and PiSSA-1 < their 5-iteration versions; the helper agrees with the float64 reference."""
    w = decaying(128, 128, seed=4, decay=0.93)
    quant = nf4_quantizer(NF4)(quant_layer(w))
    r = 16
    got = {(m, t): init_error_reduction(w, m, r, quant, t) for m in ("loftq", "pissa") for t in (1, 5)}
    assert init_error_reduction(w, "qlora", r, quant) == 0.0
    for (m, t), value in got.items():
        lr, base = (reference_qpissa if m == "pissa" else reference_loftq)(w, r, t)
        assert value == pytest.approx(ratio(w, lr, base), abs=0.05), (m, t)
    assert 0 < got["loftq", 1] < got["loftq", 5]
    assert 0 < got["pissa", 1] < got["pissa", 5]
    assert got["pissa", 5] > got["loftq", 1]


def test_quantizer_uses_storage_layout_and_dtype():
    from transformers.pytorch_utils import Conv1D

    w = torch.randn(48, 80)  # (out, in)
    conv = Conv1D(48, 80)  # weight (in, out)
    with torch.no_grad():
        conv.weight.copy_(w.t())
    deq = nf4_quantizer(NF4)(conv)(w)
    assert torch.equal(deq, NF4Tensor.from_dense(w.t().contiguous()).dequantize().float().t())
    assert not torch.equal(deq, NF4Tensor.from_dense(w).dequantize().float())  # blocks run along the stored rows
    lin = quant_layer(w).to(torch.bfloat16)
    assert torch.equal(nf4_quantizer(NF4)(lin)(w), NF4Tensor.from_dense(w.to(torch.bfloat16)).dequantize().float())


def test_apply_adapter_then_storage_end_to_end():
    """train.py's order: apply_adapter (QPiSSA init) then apply_storage (nf4 of the residual)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from memfit.quant import apply_storage

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    dense = copy.deepcopy(model)
    storage = OmegaConf.create(NF4)
    cfg = OmegaConf.create({"name": "pissa", "rank": 8, "alpha": 8, "targets": ["q_proj", "up_proj"], "iters": 2,
                            "progress": False})
    model = apply_storage(apply_adapter(model, cfg, storage=storage), storage)
    lay = adapter_layers(model)["model.layers.0.mlp.up_proj"]
    w = dense.model.layers[0].mlp.up_proj.weight.detach()
    assert isinstance(lay.base_layer.weight, NF4Tensor)
    lr_ref, base_ref = reference_qpissa(w, 8, 2)
    assert torch.allclose(lay.base_layer.weight.dequantize().double(), nf4_deq(base_ref), atol=1e-4)
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        out = model(input_ids=x).logits
    assert torch.isfinite(out).all()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 8 * (64 + 64) + 8 * (64 + 128)
