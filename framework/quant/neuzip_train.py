"""Full fine-tuning with the trained Linear weights kept NeuZip-compressed between steps (the NeuZip paper's
LOMO-style training): in backward each layer decodes its weight once, computes the input gradient, forms its own
weight gradient, applies the optimizer update in fp32 and re-compresses, so neither a dense weight nor a weight
gradient outlives its layer's backward.

Why a fused update: a compressed weight cannot hold a `.grad` to be stepped later, and keeping dense gradients for
every layer until `optimizer.step()` would cost more memory than the compression saves.

The update follows the run's configured optimizer (read at every step from its first param group, so the scheduler's
learning rate applies): `torch.optim.SGD` (momentum, dampening, nesterov, weight decay) or `torch.optim.AdamW`
(betas, eps, decoupled weight decay; no amsgrad), with the same formulas as torch's single-tensor implementations.
AdamW's two moments are dense fp32 tensors (8 bytes per weight): SGD without momentum is the memory-lean choice.
Limits, checked with clear errors: no gradient accumulation, no gradient clipping of these weights, no FSDP, and a
weight used once per backward (no tying). Storage: `storage=neuzip storage.train_compressed=true adapter=none`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from memfit.quant.neuzip import NeuZipTensor, lane_length


class InBackwardOptimizer:
    """Applies the bound optimizer's update rule to NeuZip-stored weights as their gradients appear in backward."""

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None
        self.names: list[str] = []  # the weights it trains (their stores carry `name` and `trainer`)
        self.state: dict[str, dict[str, Any]] = {}
        self._done: set[str] = set()

    def register(self, name: str, w: NeuZipTensor) -> None:
        w._s.name, w._s.trainer = name, self
        self.names.append(name)

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, (torch.optim.SGD, torch.optim.AdamW)):
            raise ValueError("storage.train_compressed=true updates weights inside backward and supports "
                             f"torch.optim.SGD or torch.optim.AdamW, got {type(optimizer).__name__}")
        group = optimizer.param_groups[0]
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("storage.train_compressed=true does not support amsgrad or maximize")
        self.optimizer = optimizer

    def linear(self, x: torch.Tensor, w: NeuZipTensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear of a weight this optimizer trains (neuzip_prefetch.neuzip_linear hands it here)."""
        return trained_linear(x, w, bias)

    def begin_step(self) -> None:
        """Call once before each backward (LMModule does, per training batch)."""
        self._done.clear()

    # ---- the update ----------------------------------------------------------------------------------------------
    def update(self, w: NeuZipTensor, dense: torch.Tensor, grad: torch.Tensor) -> None:
        """w <- compress(step(dense, grad)); `dense` is w decoded, `grad` its fp32 gradient."""
        if self.optimizer is None:
            raise RuntimeError("InBackwardOptimizer.update before bind(optimizer): no learning rate to apply")
        name = w._s.name
        if name in self._done:
            raise RuntimeError(f"NeuZip-trained weight {name} received two gradients in one step (tied or reused "
                               "weight, or begin_step() not called): not supported")
        self._done.add(name)
        group = self.optimizer.param_groups[0]
        p = dense.float()
        st = self.state.setdefault(name, {"step": 0})
        for k, v in st.items():  # after a resume the state comes from the CPU
            if torch.is_tensor(v) and v.device != p.device:
                st[k] = v.to(p.device)
        st["step"] += 1
        lr, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))
        if isinstance(self.optimizer, torch.optim.AdamW):
            b1, b2 = group["betas"]
            if "exp_avg" not in st:
                st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            m, v, t = st["exp_avg"], st["exp_avg_sq"], st["step"]
            p.mul_(1 - lr * wd)
            m.lerp_(grad, 1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            denom = (v.sqrt() / (bc2 ** 0.5)).add_(group["eps"])
            p.addcdiv_(m, denom, value=-lr / bc1)
        else:
            mom, damp, nest = group.get("momentum", 0.0), group.get("dampening", 0.0), group.get("nesterov", False)
            d = grad.add(p, alpha=wd) if wd else grad
            if mom:
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = d.clone()
                else:
                    st["momentum_buffer"].mul_(mom).add_(d, alpha=1 - damp)
                buf = st["momentum_buffer"]
                d = d.add(buf, alpha=mom) if nest else buf
            p.add_(d, alpha=-lr)
        with torch.no_grad():
            w.copy_(p.to(w.dtype))  # re-compress with w's settings; every view of w sees the new form

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {n: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in s.items()} for n, s in self.state.items()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        unknown = sorted(set(sd) - set(self.names))
        if unknown:
            raise ValueError(f"in-backward optimizer state for weights this model does not have: {unknown[:3]}")
        self.state = {n: dict(s) for n, s in sd.items()}


_ANCHOR = torch.empty(0, requires_grad=True)  # makes autograd call backward even when no input needs a gradient


class _TrainedNeuZipLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor, w: NeuZipTensor, bias: torch.Tensor | None,
                opt: InBackwardOptimizer) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.w, ctx.opt, ctx.has_bias = w, opt, bias is not None
        with torch._C.DisableTorchFunctionSubclass():
            return F.linear(x, w.dequantize().to(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (x,) = ctx.saved_tensors
        dense = ctx.w.dequantize()
        gx = grad @ dense.to(grad.dtype) if ctx.needs_input_grad[0] else None
        g2, x2 = grad.reshape(-1, grad.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()
        ctx.opt.update(ctx.w, dense, g2.t() @ x2)
        gb = g2.sum(0).to(grad.dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return gx, None, None, gb, None


def trained_linear(x: torch.Tensor, w: NeuZipTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear for a weight trained in backward (called by neuzip_linear with autocast already applied)."""
    return _TrainedNeuZipLinear.apply(x, _ANCHOR, w, bias, w._s.trainer)


def apply_trainable_neuzip(model: nn.Module, cfg: Any) -> InBackwardOptimizer:
    """Compress every TRAINABLE Linear weight (>= min_numel elements; lm_head only with include_embeddings); returns
    the InBackwardOptimizer that updates them (the storage object hands it to `CompressedTraining`)."""
    k = cfg.get("mantissa_bits", None)
    block, min_numel = cfg.get("block_size", None), int(cfg.get("min_numel", 4096))
    spl = lane_length(cfg)
    include_head = bool(cfg.get("include_embeddings", False))
    opt = InBackwardOptimizer()
    seen: set[int] = set()
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(mod, nn.Linear) or not isinstance(w, nn.Parameter) or not w.requires_grad:
            continue
        if (name.endswith("lm_head") and not include_head) or w.numel() < min_numel:
            continue
        if id(w) in seen:
            raise ValueError(f"storage.train_compressed=true: {name}.weight is tied to another module's weight; "
                             "tied weights cannot be updated inside backward")
        seen.add(id(w))
        z = NeuZipTensor.from_dense(w.data, k, block=block, symbols_per_lane=spl)
        opt.register(f"{name}.weight", z)
        mod.weight = nn.Parameter(z, requires_grad=False)  # not the Lightning optimizer's: updated in backward
    if not opt.names:
        raise ValueError("storage.train_compressed=true found no trainable Linear weight to compress "
                         "(use adapter=none for full fine-tuning)")
    return opt


STATE_KEY = "optimizer_states_in_backward"  # FM-Delta compresses every optimizer_states* entry of a checkpoint
LEGACY_STATE_KEYS = ("neuzip_optimizer",)  # the key of checkpoints written before


class CompressedTraining(L.Callback):
    """Runs the in-backward optimizer of `storage.train_compressed`: binds it to the run's optimizer (its update rule,
    hyper-parameters and scheduled learning rate), starts each step, and saves/restores its state in checkpoints."""

    def __init__(self, trainer: InBackwardOptimizer):
        self.inner = trainer

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.inner.bind(trainer.optimizers[0])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.inner.begin_step()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[STATE_KEY] = self.inner.state_dict()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        key = next((k for k in (STATE_KEY, *LEGACY_STATE_KEYS) if k in checkpoint), None)
        if key is None:
            raise ValueError("checkpoint has no state for the compressed-trained weights "
                             "(storage.train_compressed=true): it was written by a different run configuration")
        self.inner.load_state_dict(checkpoint[key])
