"""Shared inputs and references for the CCE tests: peaked/flat generators, a logits-materialising reference, checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_inputs(n: int, v: int, d: int, kind: str, seed: int = 0, ignore_every: int = 0):
    """(e, c, targets) in fp32. peaked: C rows copied from E (|e|=4) so predictions are confident; flat: logits ~ N(0,1)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "peaked":
        e = torch.randn(n, d, generator=g)
        e = 4 * e / e.norm(dim=1, keepdim=True)
        c = torch.randn(v, d, generator=g) / d**0.5
        k = min(n, v) // 2
        c[:k] = e[:k]
        t = torch.randint(0, v, (n,), generator=g)
        t[:k] = torch.arange(k)
    elif kind == "flat":
        e = torch.randn(n, d, generator=g) / d**0.5
        c = torch.randn(v, d, generator=g)
        t = torch.randint(0, v, (n,), generator=g)
    else:
        raise ValueError(kind)
    if ignore_every:
        t[::ignore_every] = -100
    return e, c, t


def reference(e, c, t, *, bias=None, ignore_index=-100, shift=0, softcap=None, reduction="mean", label_smoothing=0.0,
              z_loss=0.0):
    """Materialised-logits loss in the inputs' own dtype (torch semantics); returns (loss, lse)."""
    z = e @ c.T
    if bias is not None:
        z = z + bias
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    if shift:
        pad = t.new_full(t.shape[:-1] + (min(shift, t.shape[-1]),), ignore_index)
        t = torch.cat([t[..., shift:], pad], dim=-1)
    zf, tf = z.reshape(-1, z.shape[-1]), t.reshape(-1)
    valid = tf != ignore_index
    rows = F.cross_entropy(zf, tf, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    lse = torch.logsumexp(zf, dim=-1)
    rows = torch.where(valid, rows + z_loss * lse * lse, torch.zeros_like(rows))
    if reduction == "mean":
        loss = rows.sum() / valid.sum().clamp(min=1)
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.reshape(t.shape)
    return loss, lse.reshape(t.shape)


def run_with_grads(fn, e, c, bias=None, weight=None, lse_weight=None):
    """Call fn(e, c, bias) -> (loss, lse) on fresh leaves; backprop a random-weighted sum; return values and grads."""
    e, c = e.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    loss, lse = fn(e, c, b)
    obj = (loss * weight.to(loss.dtype)).sum() if weight is not None else loss.sum()
    if lse_weight is not None:
        obj = obj + (lse * lse_weight.to(lse.dtype)).sum()
    obj.backward()
    out = {"loss": loss.detach(), "lse": lse.detach(), "de": e.grad, "dc": c.grad}
    if b is not None:
        out["db"] = b.grad
    return out


def assert_close_to_gt(gt: dict, impl: dict, ref: dict, tol: float, keys=None) -> None:
    """|gt - impl| <= |gt - ref_same_dtype| + tol * max|gt|, elementwise, for every key (no NaN anywhere)."""
    for k in keys or gt:
        g, i, r = gt[k].double(), impl[k].double(), ref[k].double()
        assert torch.isfinite(i).all(), f"{k}: non-finite values"
        bound = (g - r).abs() + tol * g.abs().max().clamp(min=1e-12)
        err = (g - i).abs()
        assert (err <= bound).all(), f"{k}: max excess {float((err - bound).max()):.3e} (max err {float(err.max()):.3e})"
