"""Full fine-tuning with NeuZip-compressed trained weights (framework/quant/neuzip_train.py): the in-backward update
equals torch's own SGD / AdamW on a dense twin, lossy re-compression stays within its rounding bound, the weights stay
compressed between steps, a Lightning run matches the dense run step by step and resumes exactly, bad set-ups fail."""

from __future__ import annotations

import copy
import io

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from memfit.quant import NeuZipTensor
from memfit.quant.neuzip_train import STATE_KEY, InBackwardOptimizer, apply_trainable_neuzip
from memfit.train import run

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.0, foreach=False),
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, foreach=False),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, dampening=0.0, foreach=False),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, foreach=False),
}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.SiLU(), nn.Linear(96, 40, bias=False))


def storage(**kw) -> OmegaConf:
    return OmegaConf.create({"name": "neuzip", "mantissa_bits": None, "block_size": None, "min_numel": 0, **kw})


def compressed(model: nn.Module, **kw) -> tuple[nn.Module, InBackwardOptimizer]:
    """`model` with its trainable Linear weights compressed, and the in-backward optimizer that trains them."""
    return model, apply_trainable_neuzip(model, storage(**kw))


def train(model: nn.Module, make_opt, steps: int, inner: InBackwardOptimizer | None = None,
          device: str = "cpu") -> list[float]:
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    if inner is not None:
        inner.bind(opt)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(16, 48, generator=gen).to(device), torch.randn(16, 40, generator=gen).to(device)
        if inner is not None:
            inner.begin_step()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_in_backward_update_equals_torch_optimizer(name):
    ref = mlp()
    ours, inner = compressed(copy.deepcopy(ref))
    assert isinstance(ours[0].weight, NeuZipTensor) and not ours[0].weight.requires_grad
    assert ours[0].bias.requires_grad  # small dense parameters stay with the ordinary optimizer
    moved = ours[0].weight._s.moved("cpu")  # what .to(device) builds: the trainer link must survive it
    assert moved.trainer is inner and moved.name == "0.weight"
    l_ref = train(ref, OPTIMIZERS[name], 4)
    l_ours = train(ours, OPTIMIZERS[name], 4, inner)
    torch.testing.assert_close(torch.tensor(l_ours), torch.tensor(l_ref), rtol=1e-6, atol=1e-7)
    for i in (0, 2):
        w = ours[i].weight
        assert isinstance(w, NeuZipTensor) and w.compressed_nbytes < w.numel() * 4  # still compressed
        torch.testing.assert_close(w.dequantize(), ref[i].weight.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours[0].bias.detach(), ref[0].bias.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sgd_momentum_wd", "adamw"])
def test_gpu_in_backward_update_equals_torch_optimizer(name):
    """The same on CUDA: fused Triton decode in forward/backward, re-compression on the device."""
    ref = mlp().cuda()
    ours, inner = compressed(copy.deepcopy(ref))
    assert ours[0].weight.device.type == "cuda"
    l_ref = train(ref, OPTIMIZERS[name], 4, device="cuda")
    l_ours = train(ours, OPTIMIZERS[name], 4, inner, device="cuda")
    torch.testing.assert_close(torch.tensor(l_ours), torch.tensor(l_ref), rtol=1e-5, atol=1e-6)
    for i in (0, 2):
        torch.testing.assert_close(ours[i].weight.dequantize(), ref[i].weight.detach(), rtol=1e-4, atol=1e-6)


def test_lossy_recompression_within_rounding_bound():
    """k=3: after an SGD step every stored weight keeps 3 mantissa bits and is within half an ulp (2^-4 relative) of
    the exact float64 update of the previously stored weight (gradient from a float64 twin)."""
    model, inner = compressed(mlp(), mantissa_bits=3)
    low = (1 << 20) - 1  # fp32 mantissa bits below the top 3
    w0 = {i: model[i].weight.dequantize().double() for i in (0, 2)}
    assert all((w.float().view(torch.int32) & low).eq(0).all() for w in w0.values())
    twin = nn.Sequential(nn.Linear(48, 96), nn.SiLU(), nn.Linear(96, 40, bias=False)).double()
    with torch.no_grad():
        twin[0].weight.copy_(w0[0])
        twin[0].bias.copy_(model[0].bias.double())
        twin[2].weight.copy_(w0[2])
    x, y = torch.randn(16, 48), torch.randn(16, 40)
    (twin(x.double()) - y.double()).square().mean().backward()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    inner.bind(opt)
    inner.begin_step()
    (model(x) - y).square().mean().backward()
    for i in (0, 2):
        exact = w0[i] - 0.1 * twin[i].weight.grad
        after = model[i].weight.dequantize().double()
        assert (after.float().view(torch.int32) & low).eq(0).all()
        assert ((after - exact).abs() <= exact.abs() * 2.0 ** -4 * (1 + 1e-5) + 1e-12).all()
        assert not torch.equal(after, w0[i])


def test_bad_setups_fail_clearly():
    model, inner = compressed(mlp())
    with pytest.raises(ValueError, match="SGD or torch.optim.AdamW"):
        inner.bind(torch.optim.Adagrad([model[0].bias]))
    with pytest.raises(RuntimeError, match="before bind"):
        model(torch.randn(2, 48)).sum().backward()
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable Linear"):
        apply_trainable_neuzip(frozen, storage())
    tied = mlp()
    tied.append(nn.Linear(96, 40, bias=False))
    tied[3].weight = tied[2].weight
    with pytest.raises(ValueError, match="tied"):
        apply_trainable_neuzip(tied, storage())


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


COMPRESSED = ["storage=neuzip", "storage.train_compressed=true", "storage.min_numel=0"]
RUN = ["adapter=none", "optim=sgd", "optim.lr=0.05", "trainer.gradient_clip_val=null", "scheduler.warmup_steps=2",
       "trainer.max_steps=6", "trainer.val_check_interval=6", "eval.test=false"]


def _record(monkeypatch, rec: LossRecorder) -> None:
    import memfit.train as train_mod

    orig = train_mod.make_callbacks
    monkeypatch.setattr(train_mod, "make_callbacks", lambda cfg, *a, **k: orig(cfg, *a, **k) + [rec])


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_lightning_run_matches_dense_run(fast_cfg, monkeypatch, optim):
    dense, comp = LossRecorder(), LossRecorder()
    over = [o.replace("optim=sgd", f"optim={optim}") for o in RUN]
    _record(monkeypatch, dense)
    ref = run(fast_cfg(*over))
    _record(monkeypatch, comp)
    res = run(fast_cfg(*over, *COMPRESSED))
    # every weight is trained in both runs (the compressed ones inside backward), so the report counts them all
    assert res["trainable_params"] == ref["trainable_params"] == ref["total_params"] == res["total_params"]
    assert sorted(comp.losses) == sorted(dense.losses) == list(range(1, 7))
    for s in dense.losses:
        assert abs(comp.losses[s] - dense.losses[s]) <= 1e-5 * abs(dense.losses[s]), (s, comp.losses, dense.losses)
    assert dense.losses[6] < dense.losses[1]


@pytest.mark.parametrize("callbacks", [["callbacks=default"],
                                       ["callbacks=fmdelta", "callbacks.fmdelta.optimizer_codec=zlib"]])
def test_resume_restores_compressed_weights_and_state(fast_cfg, tmp_path, monkeypatch, callbacks):
    """Resume is exact with plain checkpoints and with FM-Delta ones, whose generic codec then also packs the
    in-backward optimizer's AdamW moments."""
    common = [*[o for o in RUN if not o.startswith("trainer.max_steps")], *COMPRESSED, "optim=adamw",
              "data.n_train=40", *callbacks, "~callbacks.progress", "~callbacks.lr_monitor",
              "callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.model_checkpoint.save_top_k=-1",
              "trainer.max_steps=6"]
    full, resumed = LossRecorder(), LossRecorder()
    _record(monkeypatch, full)
    cfg = fast_cfg(*common)
    cfg.paths.output_dir = str(tmp_path / "run")
    run(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "step000003.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    if callbacks[0] == "callbacks=default":
        assert STATE_KEY in saved
    else:  # zlib bytes inside the FM-Delta blob, restored to the same moments on load
        from memfit.callbacks.fmdelta import KEY, generic_decompress

        payload = saved[KEY][STATE_KEY]  # raw uint8 storage in the .ckpt, not pickled bytes
        assert STATE_KEY not in saved and isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8
        moments = torch.load(io.BytesIO(generic_decompress(payload.numpy().tobytes(), "zlib")))
        assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(moments.values())))
    _record(monkeypatch, resumed)
    cfg = fast_cfg(*common)
    cfg.paths.output_dir = str(tmp_path / "second")
    cfg.ckpt_path = str(ckpt)
    run(cfg)
    assert sorted(resumed.losses) == [4, 5, 6]
    for s in resumed.losses:
        assert resumed.losses[s] == full.losses[s], (s, resumed.losses, full.losses)


def test_config_errors_name_the_problem(fast_cfg):
    with pytest.raises(ValueError, match="needs adapter=none"):
        run(fast_cfg(*COMPRESSED, "adapter=lora"))
    with pytest.raises(ValueError, match="gradient_clip_val=null"):
        run(fast_cfg(*COMPRESSED, "adapter=none", "trainer.gradient_clip_val=1.0"))
