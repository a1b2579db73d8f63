"""Distributed linear cross-entropy: FSDP2/DTensor classifier weights and vocabulary-parallel (V-sharded) heads.

DTensor: an FSDP2-sharded weight read outside its module's forward is still a DTensor shard; `full_tensor()` gathers it
differentiably (its backward reduce-scatters dC), and the fused loss runs on the plain gathered tensor.

Vocab-parallel: each rank holds a contiguous slice of the vocabulary (rank order). Ranks compute their slice's row
statistics, combine them with three all-reduces (max / sum-exp for the LSE, sum for target logit and logit sum), and in
backward each rank forms its own dC slice and a partial dE that is summed over the group (in fp32).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from memfit.kernels.cce.ops import coefficients, grad, local_targets, row_loss, stats

try:  # torch >= 2.5 exposes DTensor publicly
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(x: object) -> bool:
    return DTensor is not None and isinstance(x, DTensor)


def gather_dtensor(x: torch.Tensor | None) -> torch.Tensor | None:
    """A plain full tensor from a (possibly sharded) DTensor, differentiably; anything else unchanged."""
    return x.full_tensor() if is_dtensor(x) else x


def local_shard(x: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's local piece of a DTensor (differentiable), anything else unchanged."""
    return x.to_local() if is_dtensor(x) else x


def vocab_offsets(v_local: int, group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(first global column of this rank, global vocabulary size) from every rank's slice size."""
    sizes = [None] * dist.get_world_size(group)
    dist.all_gather_object(sizes, v_local, group=group)
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


class VocabParallelCCE(torch.autograd.Function):
    """Per-row (loss, lse) of a vocabulary-sharded head; see the module docstring."""

    @staticmethod
    def forward(ctx, e, c, bias, targets, group, ignore_index, softcap, ls, zl, filter_eps, sort_vocab, accum_fp32,
                impl):
        v_local = c.shape[0]
        v_start, v_total = vocab_offsets(v_local, group)
        tgt = local_targets(targets, ignore_index, v_start, v_local, v_total)
        lse_l, tlogit, sumz = stats(e, c, bias, tgt, softcap, ls > 0, impl)
        m = lse_l.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s = torch.exp(lse_l - m_safe)
        dist.all_reduce(s, group=group)
        lse = m_safe + torch.log(s)
        dist.all_reduce(tlogit, group=group)
        if ls:
            dist.all_reduce(sumz, group=group)
        valid = targets != ignore_index
        loss = row_loss(lse, tlogit, sumz, valid, v_total, ls, zl)
        ctx.save_for_backward(e, c, bias, tgt, lse, valid)
        ctx.opts = (group, v_total, softcap, ls, zl, filter_eps, sort_vocab, accum_fp32, impl)
        return loss.float(), lse.float()

    @staticmethod
    def backward(ctx, g_row, g_lse):
        e, c, bias, tgt, lse, valid = ctx.saved_tensors
        group, v_total, softcap, ls, zl, filter_eps, sort_vocab, accum_fp32, impl = ctx.opts
        g_row = g_row if g_row is not None else torch.zeros_like(lse)
        g_lse = g_lse if g_lse is not None else torch.zeros_like(lse)
        a, b, u = coefficients(g_row, g_lse, lse, valid, v_total, ls, zl)
        de, dc, db = grad(e, c, bias, tgt, lse, a, b, u, softcap, filter_eps, sort_vocab, accum_fp32, impl)
        de32 = de.float() if de.dtype != torch.float64 else de
        dist.all_reduce(de32, group=group)
        return de32.to(e.dtype), dc, db, None, None, None, None, None, None, None, None, None, None
