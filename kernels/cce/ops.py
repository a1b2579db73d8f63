"""Backend dispatch and the opaque custom ops behind `memfit.kernels.cce.linear_cross_entropy`.

`stats` / `grad` pick Triton (CUDA, or CPU under TRITON_INTERPRET=1 when asked) or the chunked torch reference.
`memfit_cce::forward` / `memfit_cce::backward` wrap them as torch.library custom ops with fake kernels and an autograd
formula, so the loss works in eager mode, under autocast (inputs cast by the caller) and inside torch.compile graphs.

Per row (valid target t): loss = lse - (1 - ls) z_t - (ls / V) sum_j z_j + zl lse^2, the same as F.cross_entropy with
label_smoothing=ls plus a z-loss zl * lse^2. Its gradient w.r.t. z_ij is a p_ij - b [j == t] - u with
a = g (1 + 2 zl lse) + g_lse, b = g (1 - ls), u = g ls / V.
"""

from __future__ import annotations

import os

import torch

from memfit.kernels.cce.reference import grad_torch, stats_torch

IMPLS = ("auto", "triton", "torch")


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' means Triton on CUDA and the chunked torch reference elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not a valid option; choose one of: {', '.join(IMPLS)}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 (set before importing kernels)")
    return impl


def stats(e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, tgt: torch.Tensor, softcap: float,
          need_sumz: bool, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, target logit, logit sum) per row in fp32 (fp64 for fp64 inputs); tgt < 0 means no target."""
    if resolve_impl(impl, e.device) == "torch" or e.dtype == torch.float64:
        return stats_torch(e, c, bias, tgt, softcap or None, need_sumz)
    from memfit.kernels.cce.fwd import stats_triton

    return stats_triton(e, c, bias, tgt, softcap or None, need_sumz)


def grad(e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, tgt: torch.Tensor, lse: torch.Tensor,
         a: torch.Tensor, b: torch.Tensor, u: torch.Tensor | None, softcap: float, filter_eps: float,
         sort_vocab: bool, accum_fp32: bool, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dE, dC, dbias). filter_eps <= 0 is exact. The uniform smoothing term u is added in closed form when there is
    no softcap (so filtering stays valid); with softcap it is per element, and filtering is turned off."""
    if resolve_impl(impl, e.device) == "torch" or e.dtype == torch.float64:
        return grad_torch(e, c, bias, tgt, lse, a, b, u, softcap or None)
    from memfit.kernels.cce.bwd import grad_triton

    analytic = u is not None and filter_eps > 0 and not softcap
    if u is not None and softcap:
        filter_eps = 0.0
    de, dc, db = grad_triton(e, c, bias, tgt, lse, a, b, None if analytic else u, softcap or None,
                             filter_eps if filter_eps > 0 else None, sort_vocab, accum_fp32)
    if analytic:
        csum = c.sum(dim=0, dtype=torch.float32)
        de = (de.float() - u[:, None] * csum[None, :]).to(e.dtype)
        w = (e.float().T @ u.float())
        dc.sub_(w.to(dc.dtype)[None, :])
        if db is not None:
            db.sub_(u.sum().to(db.dtype))
    return de, dc, db


def row_loss(lse: torch.Tensor, tlogit: torch.Tensor, sumz: torch.Tensor, valid: torch.Tensor, v_total: int,
             label_smoothing: float, z_loss: float) -> torch.Tensor:
    """Per-row loss from the row statistics (0 on ignored rows)."""
    loss = lse - (1.0 - label_smoothing) * tlogit
    if label_smoothing:
        loss = loss - (label_smoothing / v_total) * sumz
    if z_loss:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss))


def coefficients(g_row: torch.Tensor, g_lse: torch.Tensor, lse: torch.Tensor, valid: torch.Tensor, v_total: int,
                 label_smoothing: float, z_loss: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(a, b, u) of the gradient formula in the module docstring, zero on ignored rows (except the LSE term)."""
    g = torch.where(valid, g_row.to(lse.dtype), torch.zeros_like(lse))
    a = g * (1.0 + 2.0 * z_loss * lse) + g_lse.to(lse.dtype)
    b = g * (1.0 - label_smoothing)
    u = g * (label_smoothing / v_total) if label_smoothing else None
    return a, b, u


def local_targets(targets: torch.Tensor, ignore_index: int, v_start: int, v_local: int, v_total: int) -> torch.Tensor:
    """Targets as local column ids (-1: ignored or held by another rank); raises on ids outside [0, V)."""
    t = targets.long()
    bad = (t != ignore_index) & ((t < 0) | (t >= v_total))
    if bool(bad.any()):
        raise ValueError(f"targets hold ids outside [0, {v_total}) that are not ignore_index={ignore_index}: "
                         f"{t[bad][:5].tolist()}")
    t = torch.where(t == ignore_index, torch.full_like(t, -1), t)
    return torch.where((t >= v_start) & (t < v_start + v_local), t - v_start, torch.full_like(t, -1))


# ------------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("memfit_cce::forward", mutates_args=())
def cce_forward(e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                ignore_index: int, softcap: float, label_smoothing: float, z_loss: float, filter_eps: float,
                sort_vocab: bool, accum_fp32: bool, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss, lse), both fp32 of length N. Backward-only options ride along for the autograd formula."""
    v = c.shape[0]
    tgt = local_targets(targets, ignore_index, 0, v, v)
    lse, tlogit, sumz = stats(e, c, bias, tgt, softcap, label_smoothing > 0, impl)
    valid = targets != ignore_index
    loss = row_loss(lse, tlogit, sumz, valid, v, label_smoothing, z_loss)
    dt = torch.float64 if e.dtype == torch.float64 else torch.float32
    return loss.to(dt), lse.to(dt)


@cce_forward.register_fake
def _(e, c, bias, targets, ignore_index, softcap, label_smoothing, z_loss, filter_eps, sort_vocab, accum_fp32, impl):
    dt = torch.float64 if e.dtype == torch.float64 else torch.float32
    return e.new_empty(e.shape[0], dtype=dt), e.new_empty(e.shape[0], dtype=dt)


@torch.library.custom_op("memfit_cce::backward", mutates_args=())
def cce_backward(e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, lse: torch.Tensor,
                 g_row: torch.Tensor, g_lse: torch.Tensor, ignore_index: int, softcap: float, label_smoothing: float,
                 z_loss: float, filter_eps: float, sort_vocab: bool, accum_fp32: bool,
                 impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dE, dC, dbias); dbias is empty when there is no bias (custom ops cannot return None)."""
    v = c.shape[0]
    valid = targets != ignore_index
    tgt = torch.where(valid, targets.long(), torch.full_like(targets, -1, dtype=torch.long))
    lse_c = lse.double() if e.dtype == torch.float64 else lse
    a, b, u = coefficients(g_row, g_lse, lse_c, valid, v, label_smoothing, z_loss)
    de, dc, db = grad(e, c, bias, tgt, lse_c, a, b, u, softcap, filter_eps, sort_vocab, accum_fp32, impl)
    return de, dc, (db if db is not None else c.new_empty(0))


@cce_backward.register_fake
def _(e, c, bias, targets, lse, g_row, g_lse, ignore_index, softcap, label_smoothing, z_loss, filter_eps, sort_vocab,
      accum_fp32, impl):
    return torch.empty_like(e), torch.empty_like(c), (torch.empty_like(bias) if bias is not None else c.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    e, c, bias, targets, ignore_index, softcap, ls, zl, filter_eps, sort_vocab, accum_fp32, impl = inputs
    ctx.save_for_backward(e, c, bias, targets, output[1])
    ctx.opts = (ignore_index, softcap, ls, zl, filter_eps, sort_vocab, accum_fp32, impl)
    ctx.has_bias = bias is not None


def _backward(ctx, g_row, g_lse):
    e, c, bias, targets, lse = ctx.saved_tensors
    g_row = g_row if g_row is not None else torch.zeros_like(lse)
    g_lse = g_lse if g_lse is not None else torch.zeros_like(lse)
    de, dc, db = cce_backward(e, c, bias, targets, lse, g_row, g_lse, *ctx.opts)
    return de, dc, (db if ctx.has_bias else None), None, None, None, None, None, None, None, None, None


cce_forward.register_autograd(_backward, setup_context=_setup_context)
