"""Training a tiny model with loss=cce and loss=torch through memfit.train.run gives the same loss curve; the
app's step through the Triton CCE kernels (interpreted on CPU) matches the torch path."""

from __future__ import annotations

import contextlib

import lightning as L
import torch

from interp import interpreter
from memfit.config import compose


class StepLosses(L.Callback):
    """Every training step's loss, in order."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_cce_and_torch_loss_curves_agree_for_50_steps(tmp_path, monkeypatch):
    import memfit.train as train_mod

    curves = {}
    for loss in ("cce", "torch"):
        rec = StepLosses()
        orig = train_mod.make_callbacks
        monkeypatch.setattr(train_mod, "make_callbacks", lambda cfg, *a, rec=rec, orig=orig, **k: orig(cfg, *a, **k) + [rec])
        cfg = compose("train", [
            f"loss={loss}", "model.pretrained=false", "trainer.max_steps=50", "eval.before=false", "eval.test=false",
            "logger=none", "callbacks=none", f"paths.output_dir={tmp_path}/{loss}", f"paths.cache_dir={tmp_path}/cache",
            "model.arch.hidden_size=32", "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=1",
            "model.arch.num_attention_heads=2", "model.arch.num_key_value_heads=1",
            "data.batch_size=4", "data.n_train=200", "data.n_val=8", "data.n_test=8", "trainer.accelerator=cpu",
            "trainer.val_check_interval=1000", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "print_summary=false",
        ])
        train_mod.run(cfg)
        monkeypatch.undo()
        curves[loss] = rec.losses
    assert len(curves["cce"]) == len(curves["torch"]) == 50
    assert curves["torch"][-1] < curves["torch"][0] - 0.5  # it actually trained
    diffs = [abs(a - b) for a, b in zip(curves["cce"], curves["torch"])]
    assert max(diffs) < 1e-3, max(diffs)


class FirstStep(L.Callback):
    """Every step's loss and the parameters' gradients of the first step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grads: dict[str, torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is None:
            self.grads = {n: p.grad.detach().double().clone() for n, p in pl_module.named_parameters()
                          if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_app_trains_through_the_triton_cce_kernel_like_the_torch_path(fast_cfg, monkeypatch):
    """loss=cce with loss.impl=triton: the app's training step runs the Triton kernels themselves (interpreted on
    CPU, at a tiny size), not the chunked torch path that loss=cce takes on CPU by default. Same first-step loss and
    gradients as loss.impl=torch, and the same loss over the following (SGD) steps.

    Tolerance: both paths compute in fp32 (exact gradients, filter_eps=null); their difference is rounding only,
    |dz| ~ L sqrt(D + V) u32 |z| per logit (tests/helpers/rounding.py, L=4, u32=2**-24, D=32 hidden, V the vocabulary), which
    the model's backward passes on linearly: relative 1e-5 on the loss and on every parameter's gradient norm is
    ~10x that for V ~ 100 (the losses of later steps differ by the lr-scaled gradient differences only)."""
    from memfit.train import run

    recs, calls = {}, []
    for impl in ("triton", "torch"):
        recs[impl] = FirstStep()
        cfg = fast_cfg("loss=cce", f"loss.impl={impl}", "loss.filter_eps=null", "optim=sgd", "eval.test=false",
                       "trainer.max_steps=2", "trainer.limit_val_batches=0")
        ctx = interpreter() if impl == "triton" and not torch.cuda.is_available() else contextlib.nullcontext()
        with ctx:
            from memfit.kernels.cce import bwd as cce_bwd  # the interpreted copies, inside the context
            from memfit.kernels.cce import fwd as cce_fwd

            for mod, name in ((cce_fwd, "stats_triton"), (cce_bwd, "grad_triton")):
                fn = getattr(mod, name)
                monkeypatch.setattr(mod, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
            run(cfg, callbacks=[recs[impl]])
    tri, ref = recs["triton"], recs["torch"]
    assert calls.count("stats_triton") == calls.count("grad_triton") == 2  # one forward, one backward a step
    assert len(tri.losses) == len(ref.losses) == 2
    loss_err = [abs(a - b) / abs(b) for a, b in zip(tri.losses, ref.losses)]
    assert max(loss_err) <= 1e-5, (tri.losses, ref.losses)
    assert tri.grads.keys() == ref.grads.keys() and any("lm_head" in n for n in ref.grads)
    grad_err = {n: float((tri.grads[n] - g).norm() / g.norm().clamp(min=1e-30)) for n, g in ref.grads.items()}
    print(f"relative loss differences {loss_err}, largest gradient difference {max(grad_err.values()):.3g}")
    assert max(grad_err.values()) <= 1e-5, grad_err
