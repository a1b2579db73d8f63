"""CCE numerics on CPU: Triton (interpreted) and chunked-torch paths against float64 on the same inputs.

Bound: |impl - fp64| <= the elementwise rounding-error bound of tests/helpers/cce_common.py (`error_bounds`: the dtype's unit
roundoff times the accumulation lengths D, V, N and the sizes |E||C|^T, |d||C|, |d|^T|E| of the sums).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from cce_common import assert_within, dc_rounded_adds, error_bounds, make_inputs, reference, run_with_grads
from memfit.kernels.cce import linear_cross_entropy

pytestmark = pytest.mark.usefixtures("cpu_triton")  # impl='triton' runs interpreted on CPU

RATIOS: list[tuple] = []  # (dtype, impl, err / bound per output) of every comparison, for reports


def compare(e, c, t, dtype, impl, bias=None, weight=None, lse_weight=None, filter_eps=None, **kw):
    """Ours in `dtype` against float64 on the same dtype-rounded inputs, within `error_bounds`."""
    def ref_fn(e_, c_, b_):
        return reference(e_, c_, t, bias=b_, **kw)

    def cast(x):
        return x.to(dtype) if x is not None else None

    e, c, bias = cast(e), cast(c), cast(bias)
    gt = run_with_grads(ref_fn, e.double(), c.double(), bias.double() if bias is not None else None, weight,
                        lse_weight)
    out = run_with_grads(lambda e_, c_, b_: linear_cross_entropy(e_, c_, t, bias=b_, impl=impl, return_lse=True,
                                                                 filter_eps=filter_eps, **kw),
                         e, c, bias, weight, lse_weight)
    assert out["de"].dtype == dtype and out["dc"].dtype == dtype
    n_rows = e.numel() // e.shape[-1]
    bounds = error_bounds(e, c, t, bias=bias, weight=weight, lse_weight=lse_weight, filter_eps=filter_eps or 0.0,
                          dc_adds=dc_rounded_adds(impl, dtype, e.device, n_rows), gt=gt,
                          interpreted=impl == "triton" and e.device.type == "cpu", **kw)
    RATIOS.append((dtype, impl, assert_within(gt, out, bounds)))
    return gt, out


SIZES = [(1, 5, 3), (7, 130, 16), (64, 257, 33)]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("kind", ["peaked", "flat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_loss_lse_grads_vs_fp64(size, dtype, kind, impl):
    n, v, d = size
    e, c, t = make_inputs(n, v, d, kind, seed=n + v + d, ignore_every=3 if n > 1 else 0)
    compare(e, c, t, dtype, impl)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fp16_and_batched_shape(impl):
    e, c, t = make_inputs(24, 130, 16, "peaked", seed=3, ignore_every=5)
    compare(e.reshape(2, 12, 16), c, t.reshape(2, 12), torch.float16, impl, reduction="none", shift=1)


# softcap x smoothing x z-loss x bias, with reduction and shift cycling through their values
OPTION_GRID = list(itertools.product([None, 2.5], [0.0, 0.1], [0.0, 1e-3], [False, True]))


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("i", range(len(OPTION_GRID)))
def test_option_combinations(i, impl):
    softcap, ls, zl, has_bias = OPTION_GRID[i]
    reduction = ["mean", "sum", "none"][i % 3]
    shift = i % 2
    e, c, t = make_inputs(2 * 13, 130, 16, "peaked" if i % 2 else "flat", seed=i, ignore_every=4)
    e, t = e.reshape(2, 13, 16), t.reshape(2, 13)
    bias = torch.randn(130, generator=torch.Generator().manual_seed(i)) if has_bias else None
    weight = torch.rand(2, 13, generator=torch.Generator().manual_seed(100 + i)) if reduction == "none" else None
    compare(e, c, t, torch.float32, impl, bias=bias, weight=weight, softcap=softcap, label_smoothing=ls, z_loss=zl,
            reduction=reduction, shift=shift)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gradient_through_returned_lse(impl):
    """return_lse is differentiable: a loss on the LSE (a user-side z-loss) gets exact gradients."""
    e, c, t = make_inputs(33, 130, 16, "flat", seed=5, ignore_every=4)
    lse_w = torch.rand(33, generator=torch.Generator().manual_seed(1))
    compare(e, c, t, torch.float32, impl, lse_weight=lse_w, reduction="sum")


@pytest.mark.parametrize("softcap", [None, 10.0])
def test_filtered_gradient_error_is_bounded(softcap):
    """Each skipped tile drops terms |a p| < eps|a|: |dE_f - dE| <= eps |a_i| sum_j |C_j|, |dC_f - dC| <= eps sum_i |a_i E_i|."""
    eps = 2e-3
    e, c, t = make_inputs(64, 257, 33, "peaked", seed=11)
    grads = {}
    for name, fe, sort in [("exact", None, False), ("sorted", eps, True), ("unsorted", eps, False)]:
        e_, c_ = e.clone().requires_grad_(), c.clone().requires_grad_()
        linear_cross_entropy(e_, c_, t, softcap=softcap, filter_eps=fe, sort_vocab=sort, impl="triton").backward()
        grads[name] = (e_.grad, c_.grad)
    a = 1.0 / 64  # mean reduction over 64 valid rows: every coefficient a_i = 1/64
    bound_e = eps * a * c.abs().sum(dim=0)[None, :] + 1e-7
    bound_c = eps * a * e.abs().sum(dim=0)[None, :] + 1e-7
    for name in ("sorted", "unsorted"):
        de, dc = grads[name][0] - grads["exact"][0], grads[name][1] - grads["exact"][1]
        assert (de.abs() <= bound_e).all() and (dc.abs() <= bound_c).all(), name
        assert dc.abs().max() > 0, f"{name}: no tile was filtered, the test would prove nothing"
    # the loss itself never depends on filtering
    l_exact = linear_cross_entropy(e, c, t, softcap=softcap, filter_eps=None, impl="triton")
    l_filt = linear_cross_entropy(e, c, t, softcap=softcap, filter_eps=eps, impl="triton")
    assert torch.equal(l_exact, l_filt)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_all_ignored_batch_gives_zero_loss_and_zero_grads(impl):
    e, c, t = make_inputs(7, 130, 16, "flat", seed=2)
    t[:] = -100
    for reduction in ("mean", "sum", "none"):
        e_, c_ = e.clone().requires_grad_(), c.clone().requires_grad_()
        loss = linear_cross_entropy(e_, c_, t, impl=impl, reduction=reduction)
        loss.sum().backward()
        assert torch.equal(loss, torch.zeros_like(loss)), reduction
        assert torch.equal(e_.grad, torch.zeros_like(e)) and torch.equal(c_.grad, torch.zeros_like(c)), reduction


def test_triton_and_torch_paths_agree_at_tile_edges():
    """Sizes one off the tile sizes (16 rows, 32 columns, 16 features) on both sides: masks are right (both paths
    within the fp32 rounding bound of float64, so within twice it of each other)."""
    for n, v, d in [(15, 31, 15), (17, 33, 17), (16, 32, 16)]:
        e, c, t = make_inputs(n, v, d, "flat", seed=n)
        compare(e, c, t, torch.float32, "triton")
        compare(e, c, t, torch.float32, "torch")


def test_forward_32_and_64_bit_offsets_agree(monkeypatch):
    """Below 2**31 the forced 64-bit path gives the bits of the 32-bit one (the switch changes index width only), and
    the switch point is the element offset, not the row count alone. Offsets that really reach 2**31:
    test_forward_offsets_beyond_2_31."""
    from memfit.kernels.cce import fwd as cce_fwd

    e, c, t = make_inputs(40, 70, 24, "peaked", seed=4)
    bias = torch.randn(70)
    got = {}
    for wide in (False, True):
        monkeypatch.setattr(cce_fwd, "FORCE_WIDE_INDEX", wide)
        got[wide] = cce_fwd.stats_triton(e, c, bias, t, 30.0, True)
    assert all(torch.equal(a, b) for a, b in zip(got[False], got[True]))
    monkeypatch.setattr(cce_fwd, "FORCE_WIDE_INDEX", False)
    assert not cce_fwd.wide_index((1 << 31) - 1) and cce_fwd.wide_index(1 << 31)
    assert cce_fwd.wide_index(256000 * 2304, (1 << 20) * 2304)  # the GPU test's 2**20 x 2304 classifier


# Run in a child process: an offset wrapped to 32 bits makes the interpreted kernel read outside the buffer, which can
# kill the process (SIGSEGV) instead of failing an assertion. The rows of E (or C) lie 2**26 (2**25) elements apart in
# one bf16 buffer of 2.6e9 elements: 5 GiB of address space, of which only the pages holding the rows are ever touched
# (about 1 MiB), so the element offsets (row * stride) reach 2.6e9 > 2**31 without allocating that memory.
OFFSETS_CHILD = r"""
import sys, torch
from memfit.kernels.cce import fwd as cce_fwd
n, v, d = 40, 70, 24
which, out = sys.argv[1], sys.argv[2]
g = torch.Generator().manual_seed(0)
dense_e = torch.randn(n, d, generator=g).to(torch.bfloat16)
dense_c = (torch.randn(v, d, generator=g) / 4).to(torch.bfloat16)
stride = {"e": 1 << 26, "c": 1 << 25}[which]
rows = {"e": n, "c": v}[which]
big = torch.empty((rows - 1) * stride + d, dtype=torch.bfloat16)  # never written except at the rows below
view = big.as_strided((rows, d), (stride, 1))
view.copy_(dense_e if which == "e" else dense_c)
e, c = (view, dense_c) if which == "e" else (dense_e, view)
bias = torch.randn(v, generator=g).to(torch.bfloat16)
tgt = torch.randint(0, v, (n,), generator=g)
wide = cce_fwd.wide_index(n * e.stride(0), v * c.stride(0))
lse, tl, sz = cce_fwd.stats_triton(e, c, bias, tgt, None, True)
compact = cce_fwd.stats_triton(e.contiguous(), c.contiguous(), bias, tgt, None, True)
torch.save({"wide": wide, "e": dense_e, "c": dense_c, "bias": bias, "tgt": tgt, "got": (lse, tl, sz),
            "compact": compact, "max_offset": (rows - 1) * stride}, out)
"""


@pytest.mark.parametrize("which", ["e", "c"])
def test_forward_offsets_beyond_2_31(which, tmp_path):
    """E rows (or C rows) at element offsets up to 2.6e9: the forward takes the 64-bit path on its own (no forcing),
    gives the bits the same inputs give in a compact layout, and matches a float64 reference. Tolerance: the kernel
    upcasts bf16 to fp32 (exact), accumulates 24 products in fp32 (|err| <= 24 * 2**-24 * sum|e_k c_k|) and adds the
    bias, then takes exp/log in fp32 over 70 terms: we allow 32 * 2**-24 * (|e| @ |c|^T + |b|) for logits and sums,
    plus 16 * 2**-24 * |lse| for the log-sum-exp."""
    import os
    import subprocess
    import sys

    out = tmp_path / "res.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", OFFSETS_CHILD, which, str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"rc {proc.returncode} (-11: a 32-bit offset wrapped): {proc.stderr[-3000:]}"
    r = torch.load(out, weights_only=True)
    assert r["max_offset"] >= 1 << 31 and r["wide"]
    assert all(torch.equal(a, b) for a, b in zip(r["got"], r["compact"]))
    e, c, b, t = r["e"].double(), r["c"].double(), r["bias"].double(), r["tgt"]
    z = e @ c.T + b
    mag = e.abs() @ c.abs().T + b.abs()
    u = 2.0**-24
    lse, tl, sz = (x.double() for x in r["got"])
    ref_lse = torch.logsumexp(z, 1)
    assert torch.all((lse - ref_lse).abs() <= 32 * u * mag.max(1).values + 16 * u * ref_lse.abs())
    assert torch.all((tl - z.gather(1, t[:, None])[:, 0]).abs() <= 32 * u * mag.gather(1, t[:, None])[:, 0])
    assert torch.all((sz - z.sum(1)).abs() <= 32 * u * mag.sum(1))
