"""LoRA / PiSSA adapters: init identity, float64-SVD references, conversion, merge, peft round trip, Conv1D, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from memfit.adapters import AdapterSpec, adapter_layers, apply_adapter, convert_to_lora, export_peft, merged_copy
from memfit.adapters.inject import inject
from memfit.adapters.layer import LowRankAdapter

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # HF inits tiny std (0.02): give the weights a spread-out spectrum
        for _n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(0, 0.2)
    return model


def ids(seed: int = 1, vocab: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 12), generator=g)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def perturb(model: nn.Module, seed: int = 5) -> None:
    """Stand-in for training: move every trainable factor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def adapt(model: nn.Module, **kw) -> dict[str, LowRankAdapter]:
    spec = AdapterSpec(**{"targets": LLAMA_TARGETS, "rank": 4, "alpha": 8, "progress": False, **kw})
    return inject(model, spec)


def decaying(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A matrix with a known, well-separated geometric spectrum."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = 0.8 ** torch.arange(min(m, n), dtype=torch.float64)
    return (u * s) @ v.T


# ------------------------------------------------------------------------------------------------- init identity
@pytest.mark.parametrize("niter", [None, 4])
def test_pissa_identity_model_outputs(niter):
    model = tiny_llama()
    ref = logits(model, ids())
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    layers = adapt(model, init="pissa", niter=niter)
    assert rel(logits(model, ids()), ref) < 5e-6  # two fp32 decoder layers deep
    x = torch.randn(16, 48, generator=torch.Generator().manual_seed(2))
    for name, lay in layers.items():
        w = original[name].double()
        xi = x[:, : lay.in_features]
        with torch.no_grad():  # base'(x) + adapter(x) == base(x), per layer, in fp32
            assert rel(lay(xi), xi @ original[name].T) < 1e-6
        assert rel(lay.base_layer.weight.double() + lay.delta().double(), w) < 1e-6
        assert lay.init_meta["init"] == "pissa" and lay.init_meta["base_modified"] is True
        assert lay.base_layer.weight.dtype == torch.float32


def test_pissa_bf16_residual_stored_in_base_dtype():
    model = tiny_llama(dtype=torch.bfloat16)
    w = model.model.layers[0].self_attn.q_proj.weight.detach().float().clone()
    layers = adapt(model, init="pissa", rank=4, alpha=4)
    lay = layers["model.layers.0.self_attn.q_proj"]
    assert lay.base_layer.weight.dtype == torch.bfloat16
    res = w.double() - lay.delta().double()  # fp32 residual, then one bf16 rounding
    assert torch.equal(lay.base_layer.weight, res.float().to(torch.bfloat16))


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
@pytest.mark.parametrize("alpha", [4.0, 16.0])
def test_pissa_exact_matches_float64_svd(shape, alpha):
    from memfit.adapters.inits import pissa_factors

    w64 = decaying(*shape)
    r = 4
    s = alpha / r
    b, a, res = pissa_factors(w64.float().unsqueeze(0), r, s, niter=None)
    u, sv, vh = torch.linalg.svd(w64, full_matrices=False)
    trunc = (u[:, :r] * sv[:r]) @ vh[:r]
    assert rel(s * b[0].double() @ a[0].double(), trunc) < 1e-5
    assert rel(res[0], w64 - trunc) < 1e-5
    # the factors are U sqrt(S/s) and sqrt(S/s) V^T up to sign: their column norms are sqrt(S_r / s)
    assert torch.allclose(b[0].double().norm(dim=0), (sv[:r] / s).sqrt(), rtol=1e-5)
    assert torch.allclose(a[0].double().norm(dim=1), (sv[:r] / s).sqrt(), rtol=1e-5)


def test_pissa_randomized_equals_torch_svd_lowrank_and_converges():
    """Same Gaussian test matrix (same seed) -> the same Halko approximation as torch.svd_lowrank (peft's fast path);
    more power iterations -> closer to the float64 truncation."""
    from memfit.adapters.inits import pissa_factors

    w64 = decaying(64, 48, seed=3)
    r = 6
    u, sv, vh = torch.linalg.svd(w64, full_matrices=False)
    trunc = (u[:, :r] * sv[:r]) @ vh[:r]
    errors = []
    for niter in (0, 4, 12):
        b, a, res = pissa_factors(w64.float().unsqueeze(0), r, 1.0, niter=niter, generator=torch.Generator().manual_seed(7))
        ours = b[0].double() @ a[0].double()
        torch.manual_seed(7)
        uu, ss, vv = torch.svd_lowrank(w64.float(), q=r, niter=niter)
        assert rel(ours, (uu * ss).double() @ vv.double().T) < 1e-5
        assert rel(res[0].double() + ours, w64.float().double()) < 1e-6
        errors.append(rel(ours, trunc))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-2


def test_batched_init_equals_one_by_one():
    from memfit.adapters.inits import pissa_factors

    ws = torch.stack([decaying(20, 16, seed=i) for i in range(3)]).float()
    b, a, res = pissa_factors(ws, 3, 2.0, niter=None)
    for i in range(3):
        b1, a1, r1 = pissa_factors(ws[i:i + 1], 3, 2.0, niter=None)
        assert rel(b[i] @ a[i], b1[0] @ a1[0]) < 1e-6 and rel(res[i], r1[0]) < 1e-6


# --------------------------------------------------------------------------------------------- counts, patterns
def test_trainable_parameter_counts_lora():
    model = tiny_llama()
    layers = adapt(model, init="lora")
    expected = sum(4 * (lay.in_features + lay.out_features) for lay in layers.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected == 4 * 2 * (
        (32 + 32) * 2 + (32 + 16) * 2 + (32 + 48) * 2 + (48 + 32))
    assert len(layers) == 14
    # LoRA: B = 0 so the model is unchanged, A is Kaiming-uniform with bound 1/sqrt(in)
    lay = layers["model.layers.0.mlp.down_proj"]
    assert torch.count_nonzero(lay.lora_B) == 0 and lay.lora_A.abs().max() <= 1 / 48 ** 0.5


def test_rank_alpha_patterns_and_peft_semantics():
    from peft.utils.other import get_pattern_key

    model = tiny_llama()
    rank_pattern = {"q_proj": 2, r"layers\.1\.mlp\..*": 6}
    alpha_pattern = {"v_proj": 3}
    layers = adapt(model, init="pissa", rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    for name, lay in layers.items():
        rk = get_pattern_key(list(rank_pattern), name)
        ak = get_pattern_key(list(alpha_pattern), name)
        assert lay.rank == rank_pattern.get(rk, 4), name
        assert lay.alpha == alpha_pattern.get(ak, 8), name
    assert layers["model.layers.1.mlp.up_proj"].rank == 6 and layers["model.layers.0.mlp.up_proj"].rank == 4


# ------------------------------------------------------------------------------------- conversion, merge, export
@pytest.mark.parametrize("rslora", [False, True])
def test_convert_to_lora_on_original_base(rslora):
    original = tiny_llama()
    model = copy.deepcopy(original)
    adapt(model, init="pissa", niter=2, rslora=rslora)
    perturb(model)
    trained = logits(model, ids())
    # rebuild a plain LoRA on the ORIGINAL weights from the converted factors
    target = copy.deepcopy(original)
    for name, lay in adapter_layers(model).items():
        f = convert_to_lora(lay)
        assert f.rank == 2 * lay.rank and f.alpha == pytest.approx(lay.alpha * (2 ** 0.5 if rslora else 2))
        new = LowRankAdapter(target.get_submodule(name), f.rank, f.alpha, rslora=rslora)
        new.set_factors(f.lora_B, f.lora_A)
        target.set_submodule(name, new)
    assert rel(logits(target, ids()), trained) < 1e-5


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_merged_copy_is_plain_and_equal(init):
    model = tiny_llama()
    adapt(model, init=init)
    perturb(model)
    merged = merged_copy(model)
    assert not adapter_layers(merged) and type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert rel(logits(merged, ids()), logits(model, ids())) < 1e-5
    assert adapter_layers(model)  # the original keeps its adapters


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_peft_round_trip(init, tmp_path):
    from peft import PeftModel

    original = tiny_llama()
    model = copy.deepcopy(original)
    adapt(model, init=init, niter=3 if init == "pissa" else None, rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 5})
    perturb(model)
    path = export_peft(model, tmp_path / "adapter", base_model="tiny")
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), path).eval()
    assert rel(logits(loaded, ids()), logits(model, ids())) < 1e-5
    # and peft's own merge gives the same merged weights as ours
    merged_peft = loaded.merge_and_unload()
    ours = merged_copy(model)
    for (n, p), (_, q) in zip(merged_peft.named_parameters(), ours.named_parameters()):
        assert rel(p, q) < 1e-5, n


def test_conv1d_pissa_identity_bias_and_peft_round_trip(tmp_path):
    from peft import PeftModel

    original = tiny_gpt2()
    model = copy.deepcopy(original)
    x = ids()
    ref = logits(model, x)
    layers = adapt(model, init="pissa", targets=["c_attn", "c_proj"], rank=3, alpha=3)
    assert all(lay.fan_in_fan_out for lay in layers.values()) and len(layers) == 6  # attn.c_proj and mlp.c_proj
    assert rel(logits(model, x), ref) < 1e-6
    lay = layers["transformer.h.0.attn.c_attn"]
    w = original.transformer.h[0].attn.c_attn.weight.detach().t().double()
    assert lay.base_layer.bias is not None and rel(lay.base_layer.weight.t().double() + lay.delta().double(), w) < 1e-6
    perturb(model)
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), export_peft(model, tmp_path / "gpt2")).eval()
    assert rel(logits(loaded, x), logits(model, x)) < 1e-5
    assert rel(logits(merged_copy(model), x), logits(model, x)) < 1e-5


def test_export_metadata_records_base_replacement(tmp_path):
    import json

    from safetensors import safe_open

    model = tiny_llama()
    adapt(model, init="pissa")
    path = export_peft(model, tmp_path / "a")
    meta = json.loads((path / "memfit_adapter.json").read_text())["layers"]
    assert meta["model.layers.0.self_attn.q_proj"]["base_modified"] is True
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["memfit"])["model.layers.1.mlp.up_proj"]["init"] == "pissa"
        assert fh.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").shape == (8, 32)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16  # rank 4 -> 2r, alpha 8 -> 2 alpha


# ------------------------------------------------------------------------------------------------------ errors
def test_error_messages():
    with pytest.raises(ValueError, match="larger than min"):
        adapt(tiny_llama(), init="pissa", rank=33)
    with pytest.raises(ValueError, match=r"'nope_proj' matches no Linear"):
        adapt(tiny_llama(), targets=["nope_proj"])
    with pytest.raises(ValueError, match="match none of the adapted modules"):
        adapt(tiny_llama(), rank_pattern={"qq_proj": 2})
    with pytest.raises(ValueError, match="adapter.init='xavier'"):
        adapt(tiny_llama(), lora_init="xavier")
    model = tiny_llama()
    model.model.layers[0].self_attn.q_proj.weight = nn.Parameter(torch.zeros(32, 32, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="not a float type"):
        adapt(model, init="lora")

    class Packed(torch.Tensor):  # any tensor subclass stands for an already-quantized storage
        pass

    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj
    q.weight = nn.Parameter(q.weight.detach().as_subclass(Packed), requires_grad=False)
    with pytest.raises(TypeError, match="already stored as Packed.*QPiSSA"):
        adapt(model, init="pissa")
    with pytest.raises(ValueError, match="adapter=loftq fits the quantization error of a lossy storage.*storage=dense"):
        apply_adapter(tiny_llama(), OmegaConf.create({"name": "loftq", "rank": 2, "targets": ["q_proj"]}),
                      storage=OmegaConf.create({"name": "dense"}))
    with pytest.raises(ValueError, match="adapter.name='dora' is not a valid option"):
        apply_adapter(tiny_llama(), OmegaConf.create({"name": "dora"}))
    with pytest.raises(ValueError, match="niter must be a non-negative int"):
        adapt(tiny_llama(), init="pissa", niter=-1)


# ---------------------------------------------------------------------------------------------------- training
def test_train_run_with_pissa_only_adapters_move(fast_cfg):
    from refs import Reference, check_run

    from memfit.train import run

    ref = Reference()
    res = run(fast_cfg("adapter=pissa", "adapter.rank=4", "adapter.niter=2", "trainer.max_steps=2", "eval.test=false"),
              callbacks=[ref])
    # FAST model: hidden 32, kv dim 16, mlp 64, 2 layers; rank 4 on q,k,v,o,gate,up,down
    per_layer = 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 3 * (32 + 64))
    assert res["trainable_params"] == 2 * per_layer < res["total_params"]
    assert res["config"].adapter.name == "pissa"
    check_run(res, ref, steps=2)  # the step-2 loss (after one update of the adapters) against float64
