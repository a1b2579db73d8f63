"""NeuZipTensor: bit-exact lossless round trips over dtypes and adversarial values, lossy rounding against a float
reference, linear forward/backward equality, state_dict, FSDP2 hook round trip, storage config, bad buffers."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from memfit.quant import STORAGES, apply_storage
from memfit.quant import neuzip_codec as codec
from memfit.quant.neuzip import NeuZipTensor, shard_rows
from memfit.quant.neuzip_apply import apply_neuzip

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(codec.FORMATS[t.dtype].int_dtype)


def _adversarial(dtype: torch.dtype) -> torch.Tensor:
    fmt = codec.FORMATS[dtype]
    g = torch.Generator().manual_seed(0)
    every_exponent = torch.arange(1 << fmt.exp_bits) << fmt.man_bits  # all exponents incl. 0 (subnormal) and inf/NaN
    nan_payloads = torch.tensor([((1 << fmt.exp_bits) - 1) << fmt.man_bits | p for p in (1, 2, 3, (1 << fmt.man_bits) - 1)])
    randbits = torch.randint(0, 1 << (fmt.bits - 1), (3000,), generator=g)
    sign = torch.randint(0, 2, (every_exponent.numel() + nan_payloads.numel() + 3000,), generator=g) << (fmt.bits - 1)
    raw = torch.cat([every_exponent, nan_payloads, randbits]) | sign
    raw = torch.cat([raw, torch.tensor([0, 1 << (fmt.bits - 1), 1, 2])])  # +0, -0, smallest subnormals
    raw = torch.where(raw >= 1 << (fmt.bits - 1), raw - (1 << fmt.bits), raw).to(fmt.int_dtype)
    return raw.view(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["adversarial", "gaussian", "all_equal", "empty_like_small"])
def test_lossless_bit_exact(dtype, kind):
    if kind == "adversarial":
        w = _adversarial(dtype).view(-1, 7)[:, :7] if _adversarial(dtype).numel() % 7 == 0 else _adversarial(dtype)
    elif kind == "gaussian":
        w = (torch.randn(257, 33, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype)
    elif kind == "all_equal":
        w = torch.full((64, 64), -3.5, dtype=dtype)
    else:
        w = torch.tensor([1.5], dtype=dtype)
    z = NeuZipTensor.from_dense(w)
    assert z.shape == w.shape and z.dtype == dtype
    assert torch.equal(_bits(z.dequantize()), _bits(w))
    back = NeuZipTensor.from_bytes(z.to_bytes())
    assert len(z.to_bytes()) == z.compressed_nbytes
    assert torch.equal(_bits(back.dequantize()), _bits(w))


def _round_reference(w: torch.Tensor, k: int) -> torch.Tensor:
    """Float-arithmetic rounding to k mantissa bits (ties away from zero), saturating at the largest finite value."""
    fmt = codec.FORMATS[w.dtype]
    x = w.double()
    emin = 2 - (1 << (fmt.exp_bits - 1))
    emax = (1 << (fmt.exp_bits - 1)) - 1
    a = x.abs()
    e = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a)))).clamp(min=emin)
    q = torch.exp2(e - k)
    r = torch.floor(a / q + 0.5) * q
    max_finite = (2 - 2.0 ** -k) * 2.0 ** emax
    r = torch.where(torch.isinf(a), a, r.clamp(max=max_finite))
    return (torch.sign(x) * r).to(w.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [0, 1, 3])
def test_lossy_rounding_matches_float_reference(dtype, k):
    w = _adversarial(dtype)
    w = w[~torch.isnan(w)]
    z = NeuZipTensor.from_dense(w, mantissa_bits=k)
    got, ref = z.dequantize(), _round_reference(w, k)
    assert torch.equal(got.double(), ref.double()), (got[got.double() != ref.double()][:5],
                                                     ref[got.double() != ref.double()][:5])
    assert torch.equal(torch.signbit(got[w == 0]), torch.signbit(w[w == 0]))  # -0.0 keeps its sign


def test_lossy_nan_and_block_normalisation():
    w = torch.tensor([float("nan"), 1.0, -2.0], dtype=torch.bfloat16)
    assert torch.isnan(NeuZipTensor.from_dense(w, 1).dequantize()[0])
    with pytest.raises(ValueError, match="NaN"):
        NeuZipTensor.from_dense(w, 0)
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(64, 128, generator=g) * torch.rand(64, 1, generator=g) * 3).to(torch.bfloat16)
    z = NeuZipTensor.from_dense(w, 1, block=128)
    d = z.dequantize()
    rows = w.float().abs().argmax(1)
    assert torch.equal(d[torch.arange(64), rows], w[torch.arange(64), rows])  # each block's absmax is exact
    plain = NeuZipTensor.from_dense(w, 1).dequantize()
    assert (d.float() - w.float()).norm() < (plain.float() - w.float()).norm() * 1.2
    assert torch.equal(NeuZipTensor.from_bytes(z.to_bytes()).dequantize(), d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_forward_backward_equals_dense(dtype):
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(48, 40).to(dtype)
    lin.weight.requires_grad_(False)
    dense_w = lin.weight.detach().clone()
    x = torch.randn(2, 5, 48, generator=g).to(dtype).requires_grad_()
    y_ref = F.linear(x, dense_w, lin.bias)
    gx_ref, gb_ref = torch.autograd.grad(y_ref.square().sum(), (x, lin.bias))
    lin.weight = nn.Parameter(NeuZipTensor.from_dense(dense_w), requires_grad=False)
    y = lin(x)
    gx, gb = torch.autograd.grad(y.square().sum(), (x, lin.bias))
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref) and torch.equal(gb, gb_ref)


def test_state_dict_holds_compressed_form_and_loads():
    w = (torch.randn(512, 256) * 0.02).to(torch.bfloat16)
    lin = nn.Linear(256, 512, bias=False).to(torch.bfloat16)
    lin.weight = nn.Parameter(NeuZipTensor.from_dense(w), requires_grad=False)
    buf = io.BytesIO()
    torch.save(lin.state_dict(), buf)
    assert buf.tell() < 0.75 * w.numel() * 2  # ~11 of 16 bits: the compressed form, not the dense weight
    buf.seek(0)
    sd = torch.load(buf, weights_only=False)
    assert isinstance(sd["weight"], NeuZipTensor)
    other = nn.Linear(256, 512, bias=False).to(torch.bfloat16)
    other.weight = nn.Parameter(NeuZipTensor.from_dense(torch.zeros_like(w)), requires_grad=False)
    other.load_state_dict(sd)
    assert torch.equal(_bits(other.weight.dequantize()), _bits(w))


def test_fsdp_hooks_gather_padded_shards():
    w = (torch.randn(48, 33) * torch.logspace(-3, 1, 48)[:, None]).to(torch.float16)
    shards = shard_rows(w, 3)
    assert len({s.enc.words.numel() for s in shards}) > 1  # shards really differ in size, so padding matters
    assert all(torch.equal(_bits(s.dequantize()), _bits(c)) for s, c in zip(shards, torch.chunk(w, 3)))
    outs = [s.fsdp_pre_all_gather(None) for s in shards]
    sizes = [[t.numel() for t in o[0]] for o in outs]
    assert sizes[0] == sizes[1] == sizes[2]  # equal all-gather inputs on every rank
    gathered = tuple(torch.cat([o[0][i] for o in outs]) for i in range(len(outs[0][0])))
    dense, inner = shards[1].fsdp_post_all_gather(gathered, outs[0][1])
    assert torch.equal(_bits(dense.view(w.shape)), _bits(w)) and inner[0] is dense
    out = torch.zeros_like(w)
    assert shards[0].fsdp_post_all_gather(gathered, outs[0][1], out=out) is None
    assert torch.equal(_bits(out), _bits(w))
    corrupt = (gathered[0][:5], *gathered[1:])
    with pytest.raises(ValueError, match="do not match"):
        shards[0].fsdp_post_all_gather(corrupt, outs[0][1])


def test_compression_near_entropy_bound():
    w = (torch.randn(512, 512, generator=torch.Generator().manual_seed(4)) * 0.02).to(torch.bfloat16)
    exps, _, _ = codec.split(w)
    p = torch.bincount(exps.long()).double()
    p = p[p > 0] / p.sum()
    bound = 1 + 7 + float(-(p * p.log2()).sum())
    bits = 8 * NeuZipTensor.from_dense(w).compressed_nbytes / w.numel()
    assert bound <= bits <= bound * 1.02, (bits, bound)


def test_rejects_bad_buffers_and_dtypes():
    z = NeuZipTensor.from_dense(torch.randn(32, 32).to(torch.bfloat16))
    buf = z.to_bytes()
    with pytest.raises(ValueError, match="truncated"):
        NeuZipTensor.from_bytes(buf[:10])
    with pytest.raises(ValueError, match="header describes"):
        NeuZipTensor.from_bytes(buf[:-1])
    bad = bytearray(buf)
    bad[len(buf) // 3] ^= 0xFF
    with pytest.raises(ValueError):
        NeuZipTensor.from_bytes(bytes(bad))
    with pytest.raises(ValueError, match="supports"):
        NeuZipTensor.from_dense(torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="mantissa_bits"):
        NeuZipTensor.from_dense(torch.ones(4, dtype=torch.bfloat16), mantissa_bits=8)


def test_storage_registry_and_apply():
    assert {"neuzip", "neuzip_lossy"} <= set(STORAGES)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 4))
    for p in model.parameters():
        p.requires_grad_(False)
    model[2].weight.requires_grad_(True)  # trainable weights stay dense
    x = torch.randn(3, 64)
    ref = model(x)
    cfg = OmegaConf.create({"name": "neuzip", "mantissa_bits": None, "min_numel": 1000})
    apply_storage(model, cfg)
    assert isinstance(model[0].weight, NeuZipTensor)
    assert not isinstance(model[2].weight, NeuZipTensor) and not isinstance(model[4].weight, NeuZipTensor)
    assert torch.equal(model(x), ref)
    lossy = OmegaConf.create({"name": "neuzip_lossy", "mantissa_bits": 2})
    with pytest.raises(ValueError, match="mantissa_bits"):
        apply_neuzip(nn.Linear(4, 4), lossy)
    m = nn.Linear(128, 128).requires_grad_(False)
    apply_neuzip(m, OmegaConf.create({"name": "neuzip_lossy", "mantissa_bits": 3, "min_numel": 1}))
    assert m.weight.mantissa_bits == 3 and math.isfinite(float(m(torch.randn(2, 128)).sum()))


def test_symbols_per_lane_setting_sets_the_lane_count():
    """storage.symbols_per_lane: ceil(numel / spl) rANS lanes (4-6 bytes each), default SYMBOLS_PER_LANE."""
    from memfit.quant.neuzip import SYMBOLS_PER_LANE

    w = torch.randn(256, 200) * 0.02
    sizes = {}
    for spl in (None, 64, 4096):
        m = nn.Linear(200, 256).requires_grad_(False)
        m.weight.data.copy_(w)
        cfg = {"name": "neuzip", "min_numel": 1} | ({} if spl is None else {"symbols_per_lane": spl})
        apply_neuzip(m, OmegaConf.create(cfg))
        z = m.weight
        assert z.enc.lanes == -(-w.numel() // (spl or SYMBOLS_PER_LANE))
        assert torch.equal(z.dequantize(), w)
        sizes[spl] = z.compressed_nbytes
    # a lane stores a 4-byte final state and a 2-byte word count; up to 2 of those bytes are payload the state carries
    extra = -(-w.numel() // 64) - -(-w.numel() // 4096)
    assert 4 * extra - 64 <= sizes[64] - sizes[4096] <= 6 * extra + 64
    with pytest.raises(ValueError, match="symbols_per_lane"):
        apply_neuzip(nn.Linear(64, 64).requires_grad_(False),
                     OmegaConf.create({"name": "neuzip", "min_numel": 1, "symbols_per_lane": 0}))


@pytest.mark.gpu
def test_gpu_dequantize_and_linear_match_cpu():
    w = (torch.randn(1024, 4096) * 0.02).to(torch.bfloat16)
    z = NeuZipTensor.from_dense(w.cuda())
    assert torch.equal(_bits(z.dequantize().cpu()), _bits(w))
    zc = NeuZipTensor.from_dense(w)
    assert torch.equal(z.enc.words.cpu(), zc.enc.words)  # same bytes from Triton and C++ encoders
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = F.linear(x, z)
    y.sum().backward()
    assert torch.equal(y, F.linear(x, w.cuda()))


def test_run_neuzip_lora_losses_equal_dense(fast_cfg, monkeypatch):
    """storage=neuzip (lossless) trains exactly like dense: identical, finite per-step losses through run()."""
    import memfit.module as fm
    from memfit.train import run

    losses: list[float] = []
    step = fm.LMModule.training_step

    def record(self, batch, idx):
        loss = step(self, batch, idx)
        losses.append(float(loss))
        return loss

    monkeypatch.setattr(fm.LMModule, "training_step", record)
    got = {}
    for storage in ("dense", "neuzip"):
        losses.clear()
        run(fast_cfg(f"storage={storage}", "adapter=lora", "trainer.max_steps=2", "eval.test=false",
                     *(["storage.min_numel=1"] if storage == "neuzip" else [])))
        got[storage] = list(losses)
    assert len(got["dense"]) == 2 and all(math.isfinite(v) for v in got["dense"])
    assert got["neuzip"] == got["dense"]
