"""Shared inputs and references for the CCE tests: peaked/flat generators, a logits-materialising reference, checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rounding import U32, L, cast_roundoff, unit_roundoff


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


# ------------------------------------------------------------------------------------------------ error bounds
# The kernels are judged against float64 on the *same* inputs (already rounded to the dtype under test): what is left
# is their own arithmetic, bounded per element from the dtype's unit roundoff u = eps/2 (fp32 2**-24, bf16 2**-8,
# fp16 2**-11) and the problem size:
#   logits   z_ij: D products summed in fp32 (16-bit products are exact in fp32)   |dz| <= L sqrt(D) u32 A_ij,
#            A = |E||C|^T (+|bias|); exp/log and the online max add ~u32 (|z| + |lse|), the V-term sum L sqrt(V) u32;
#            so per row zb_i = L u32 (sqrt(D) max_j A_ij + 2 max_j |z_ij| + sqrt(V) + |lse_i| + softcap)
#   lse_i <= zb_i;  loss_i <= (2 + 2 z_loss |lse_i|) zb_i (lse and target logit), reduced like the loss, plus the
#            fp32 sum over N rows, L sqrt(N) u32 sum |loss_i|
#   d_ij = a_i p_ij - b_i [j = t_i] - u_i, |d_ij| <= Q_ij = |a_i| p_ij + |b_i| [j = t_i] + |u_i| (softcap' <= 1);
#            p carries 2 zb_i relative error; d is cast to the dtype before the dot (Triton; c = u, or eps for bf16
#            under the interpreter, which truncates) and a partial result rounded once more (smoothing in closed
#            form): (c + u) Q_ij; fp16's smallest subnormal flushes up to half of it
#   dE = d C <= 2 (Q o zb) |C| + (c + u + L sqrt(V) u32) Q|C| + tiny |C|-column sums, then rounded: u |dE|
#   dC = d^T E likewise over N rows, plus L sqrt(adds) u Q^T|E| when dC accumulates in the dtype (GPU bf16/fp16
#            atomics: one rounded add per row block, each also off by up to `tiny` in fp16's subnormal range)
#   dbias = sum_i d_ij in fp32: 2 (Q o zb)^T 1 + L sqrt(N) u32 Q^T 1, rounded: u |db|
# L = 4 makes the sqrt(K) terms probabilistic bounds (tests/helpers/rounding.py); `assert_within` returns err / bound.
# Filtering (filter_eps > 0) drops whole tiles whose every |a p| < eps |a|: at most eps |a_i| sum_j |C_j| on dE and
# eps sum_i |a_i E_i| on dC.
def dc_rounded_adds(impl: str, dtype: torch.dtype, device: torch.device | str, n_rows: int,
                    accum_fp32: bool = False) -> int:
    """How many rounded additions in `dtype` each dC element takes (0: it accumulates in fp32)."""
    device = torch.device(device)
    if impl != "triton" or dtype in (torch.float32, torch.float64) or accum_fp32:
        return 0
    if device.type != "cuda" and dtype == torch.bfloat16:
        return 0  # the interpreter has no bf16 atomics: fp32 there (kernels/cce/bwd.py)
    from memfit.kernels.cce.bwd import _config

    return -(-n_rows // _config(dtype, device)[0])


def error_bounds(e, c, t, *, bias=None, weight=None, lse_weight=None, ignore_index=-100, shift=0, softcap=None,
                 reduction="mean", label_smoothing=0.0, z_loss=0.0, filter_eps=0.0, dc_adds=0, gt=None,
                 interpreted=False) -> dict:
    """Elementwise bounds on |impl - gt| for loss, lse, de, dc (and db) of a CCE call on inputs e, c (bias) in their
    dtype; gt: the float64 results on the same inputs (for the final-rounding terms). See the derivation above."""
    dtype = e.dtype
    u, tiny = unit_roundoff(dtype), torch.finfo(dtype).tiny * torch.finfo(dtype).eps / 2
    ud = u + cast_roundoff(dtype, interpreted)  # d cast for the dot, one more rounding of a partial result
    d_feat = e.shape[-1]
    e2, cc = e.reshape(-1, d_feat).double(), c.double()
    b64 = bias.double() if bias is not None else None
    if shift:
        pad = t.new_full(t.shape[:-1] + (min(shift, t.shape[-1]),), ignore_index)
        t = torch.cat([t[..., shift:], pad], dim=-1)
    tf = t.reshape(-1)
    n, v = e2.shape[0], cc.shape[0]
    valid = tf != ignore_index
    x = e2 @ cc.T + (b64 if b64 is not None else 0.0)
    z = softcap * torch.tanh(x / softcap) if softcap else x
    lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - lse[:, None])
    big_a = e2.abs() @ cc.abs().T + (b64.abs() if b64 is not None else 0.0)
    zb = L * U32 * (d_feat**0.5 * big_a.max(dim=1).values + 2 * z.abs().max(dim=1).values + v**0.5 + lse.abs()
                    + (softcap or 0.0))
    rows = torch.where(valid, (2 + 2 * z_loss * lse.abs()) * zb, torch.zeros_like(zb))
    row_loss = torch.where(valid, lse - z.gather(1, tf.clamp(min=0)[:, None])[:, 0], torch.zeros_like(lse)).abs() \
        + z_loss * lse * lse
    count = valid.sum().clamp(min=1)
    if reduction == "mean":
        loss_b = rows.sum() / count + L * U32 * n**0.5 * row_loss.sum() / count
        g = torch.full((n,), 1.0, dtype=torch.float64, device=e.device) / count
    elif reduction == "sum":
        loss_b = rows.sum() + L * U32 * n**0.5 * row_loss.sum()
        g = torch.ones(n, dtype=torch.float64, device=e.device)
    else:
        loss_b = (rows + U32 * row_loss).reshape(t.shape)
        g = weight.reshape(-1).to(e.device, torch.float64) if weight is not None else torch.ones_like(lse)
    if reduction != "none" and weight is not None:
        g = g * weight.to(e.device, torch.float64)
    g = torch.where(valid, g, torch.zeros_like(g))
    g_lse = lse_weight.reshape(-1).to(e.device, torch.float64) if lse_weight is not None else torch.zeros_like(lse)
    a = g * (1 + 2 * z_loss * lse) + g_lse
    onehot = torch.zeros_like(p).scatter_(1, tf.clamp(min=0)[:, None], 1.0) * valid[:, None]
    q = a.abs()[:, None] * p + (g * (1 - label_smoothing)).abs()[:, None] * onehot \
        + (g * label_smoothing / v).abs()[:, None]
    qz = q * zb[:, None]
    de_b = 2 * qz @ cc.abs() + (ud + L * U32 * v**0.5) * (q @ cc.abs()) + tiny * cc.abs().sum(0)[None, :] \
        + filter_eps * a.abs()[:, None] * cc.abs().sum(0)[None, :]
    dc_b = 2 * qz.T @ e2.abs() + (ud + L * U32 * n**0.5 + L * dc_adds**0.5 * u) * (q.T @ e2.abs()) \
        + tiny * (e2.abs().sum(0)[None, :] + dc_adds) + filter_eps * (a.abs() @ e2.abs())[None, :]
    out = {"loss": loss_b, "lse": zb.reshape(t.shape), "de": de_b.reshape(e.shape), "dc": dc_b}
    if bias is not None:
        out["db"] = 2 * qz.sum(0) + L * U32 * n**0.5 * q.sum(0)
    if gt is not None:  # the result's own rounding to its dtype (loss and lse are fp32)
        for k in out:
            out[k] = out[k] + unit_roundoff(gt[k].dtype if k in ("loss", "lse") else dtype) * gt[k].double().abs() \
                * (1 + 2 * u)
    return out


def assert_within(gt: dict, impl: dict, bounds: dict, keys=None) -> dict[str, float]:
    """|gt - impl| <= bound elementwise for every key (no NaN anywhere); returns max err / bound per key."""
    ratios = {}
    for k in keys or bounds:
        g, i, b = gt[k].double(), impl[k].double(), bounds[k].double()
        assert torch.isfinite(i).all(), f"{k}: non-finite values"
        err = (g - i).abs()
        ratio = float((err / b.clamp(min=1e-300)).max())
        ratios[k] = ratio
        assert (err <= b).all(), f"{k}: err/bound up to {ratio:.3g} (max err {float(err.max()):.3e}, " \
                                 f"bound there {float(b.flatten()[(err / b).argmax()]):.3e})"
    return ratios

