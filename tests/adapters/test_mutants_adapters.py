"""Adapter initialisations and the truncated SVD against float64 references: torch.linalg.svd in float64, torch's own
nn.init for the LoRA draws, the QPiSSA/LoftQ recipes written out in float64 with their documented default of 5
iterations, and closed forms (scaling, Cholesky-QR's triangular factor). Written to kill the mutants
experiments/mutation.py found surviving."""

from __future__ import annotations

import math

import pytest
import torch

from memfit.adapters import inits, svd


def _w(shape, seed=0, decay=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    if decay:  # a decaying spectrum: well separated singular values
        m, n = shape[-2], shape[-1]
        u = torch.linalg.qr(torch.randn(*shape[:-2], m, m, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(*shape[:-2], n, n, generator=g, dtype=torch.float64)).Q
        s = torch.zeros(*shape[:-2], m, n, dtype=torch.float64)
        k = min(m, n)
        s[..., range(k), range(k)] = 2.0 ** -torch.arange(k, dtype=torch.float64) * 10
        w = u @ s @ v.mT
    return w.float()


def test_scaling_closed_form():
    assert inits.scaling(16, 4) == 4.0 and inits.scaling(16, 4, rslora=True) == 8.0
    assert inits.scaling(3, 9, True) == 1.0 and inits.scaling(1, 3) == pytest.approx(1 / 3)


def test_lora_factors_match_torch_init():
    w = torch.randn(2, 6, 10)
    b, a, base = inits.lora_factors(w, 3, "kaiming", torch.Generator().manual_seed(5))
    assert b.shape == (2, 6, 3) and torch.equal(b, torch.zeros(2, 6, 3)) and base is w and a.shape == (2, 3, 10)
    bound = 1 / math.sqrt(10)  # nn.Linear's kaiming_uniform_(a=sqrt(5)) on (r, in)
    assert float(a.abs().max()) <= bound and float(a.abs().max()) > 0.8 * bound
    assert float(a.min()) < -0.5 * bound and float(a.max()) > 0.5 * bound
    ref = torch.empty(2, 3, 10)
    torch.nn.init.uniform_(ref, -bound, bound, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, ref, atol=1e-7, rtol=0)
    big = torch.zeros(1, 4, 4000)
    _, ag, _ = inits.lora_factors(big, 4, "gaussian", torch.Generator().manual_seed(6))
    assert abs(float(ag.std()) - 1 / 4) < 0.01 and abs(float(ag.mean())) < 0.01  # N(0, 1/r) as peft's "gaussian"
    ref = torch.empty(1, 4, 4000)
    torch.nn.init.normal_(ref, 0.0, 1 / 4, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(ag, ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="adapter.init"):
        inits.lora_factors(w, 3, "orthogonal")


@pytest.mark.parametrize("shape", [(1, 12, 7), (2, 7, 12), (1, 9, 9)])
def test_pissa_factors_against_float64_svd(shape):
    w = _w(shape, 1)
    r, s = 3, 2.0
    bb, aa, base = inits.pissa_factors(w, r, s)
    u, sv, vh = torch.linalg.svd(w.double())
    top = u[..., :r] @ torch.diag_embed(sv[..., :r]) @ vh[..., :r, :]
    torch.testing.assert_close((s * bb.double() @ aa.double()), top, atol=1e-5, rtol=0)
    torch.testing.assert_close(base.double(), w.double() - top, atol=1e-5, rtol=0)
    root = (sv[..., :r] / s).sqrt()  # column norms of B and row norms of A: sqrt(S_r / s)
    torch.testing.assert_close(bb.double().norm(dim=-2), root, atol=1e-5, rtol=0)
    torch.testing.assert_close(aa.double().norm(dim=-1), root, atol=1e-5, rtol=0)


def _round_quant(step):
    return lambda m: torch.round(m / step) * step


def _qpissa64(w, r, s, q, iters):
    w64 = w.double()
    target = w64
    for t in range(iters):
        u, sv, vh = torch.linalg.svd(target)
        ba = u[..., :r] @ torch.diag_embed(sv[..., :r]) @ vh[..., :r, :] / s
        res = w64 - s * ba
        if t == iters - 1:
            return ba, res
        target = w64 - torch.stack([q(m) for m in res.unbind(0)])


def _loftq64(w, r, s, q, iters):
    w64 = w.double()
    base = w64
    for t in range(iters):
        deq = torch.stack([q(m) for m in base.unbind(0)])
        u, sv, vh = torch.linalg.svd(w64 - deq)
        ba = u[..., :r] @ torch.diag_embed(sv[..., :r]) @ vh[..., :r, :] / s
        if t == iters - 1:
            return ba, base
        base = w64 - s * ba


@pytest.mark.parametrize("iters", [None, 1, 2])
def test_qpissa_and_loftq_recipes(iters):
    w = _w((2, 10, 8), 2, decay=False)
    q = _round_quant(0.25)
    kw = {} if iters is None else {"iters": iters}
    n = 5 if iters is None else iters  # the documented default
    bb, aa, res = inits.qpissa_factors(w, 2, 1.5, q, **kw)
    ba, res64 = _qpissa64(w, 2, 1.5, q, n)
    torch.testing.assert_close(bb.double() @ aa.double(), ba, atol=1e-4, rtol=0)
    torch.testing.assert_close(res.double(), res64, atol=1e-4, rtol=0)
    bb, aa, base = inits.loftq_factors(w, 2, 1.5, q, **kw)
    ba, base64 = _loftq64(w, 2, 1.5, q, n)
    torch.testing.assert_close(bb.double() @ aa.double(), ba, atol=1e-4, rtol=0)
    torch.testing.assert_close(base.double(), base64, atol=1e-4, rtol=0)


def test_quantize_stack_and_iteration_checks():
    w = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) / 7
    out = inits.quantize_stack(w, lambda m: (m * 2).round().double() / 2)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4)
    torch.testing.assert_close(out, (w * 2).round() / 2, atol=0, rtol=0)
    seen = []
    inits.quantize_stack(w, lambda m: seen.append(tuple(m.shape)) or m)
    assert seen == [(3, 4), (3, 4)]
    for bad in (0, -1, True, 1.0):
        with pytest.raises(ValueError, match="iters"):
            inits.qpissa_factors(w, 1, 1.0, lambda m: m, iters=bad)
        with pytest.raises(ValueError, match="iters"):
            inits.loftq_factors(w, 1, 1.0, lambda m: m, iters=bad)


def test_rank_checks():
    svd.check_rank((5, 3), 3)
    svd.check_rank((2, 3, 5), 1)
    for r in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="positive int"):
            svd.check_rank((5, 3), r)
    with pytest.raises(ValueError, match="larger than"):
        svd.check_rank((5, 3), 4)
    with pytest.raises(ValueError, match="larger than"):
        svd.check_rank((3, 5), 4)


@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (3, 12, 7), (2, 7, 12), (9, 9)])
@pytest.mark.parametrize("niter", [None, 4])
def test_top_r_against_float64_svd(shape, niter):
    w = _w(shape, 3)
    r = 3
    u, s, vh = svd.top_r(w, r, niter, torch.Generator().manual_seed(0))
    assert u.shape == (*shape[:-1], r) and s.shape == (*shape[:-2], r) and vh.shape == (*shape[:-2], r, shape[-1])
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    u64, s64, vh64 = torch.linalg.svd(w.double())
    tol = 1e-5 if niter is None else 1e-2  # 4 power iterations on a spectrum halving per index: ~0.5^9 of sigma_1
    torch.testing.assert_close(s.double(), s64[..., :r], atol=tol, rtol=tol)
    torch.testing.assert_close((u.double() * s.double().unsqueeze(-2)) @ vh.double(),
                               u64[..., :r] @ torch.diag_embed(s64[..., :r]) @ vh64[..., :r, :], atol=tol, rtol=0)
    eye = torch.eye(r, dtype=torch.float64)
    torch.testing.assert_close(u.double().mT @ u.double(), eye.expand(*shape[:-2], r, r), atol=1e-5, rtol=0)
    torch.testing.assert_close(vh.double() @ vh.double().mT, eye.expand(*shape[:-2], r, r), atol=1e-5, rtol=0)


def test_randomized_oversampling_and_checks():
    w = _w((20, 16), 4, decay=False)
    g = torch.Generator().manual_seed(1)
    u, s, vh = svd.randomized_top_r(w, 3, 0, g)
    # no oversampling by default: the range finder's basis is W @ omega with omega (16, 3) drawn first
    omega = torch.randn((1, 16, 3), generator=torch.Generator().manual_seed(1))
    q = torch.linalg.qr(w.double() @ omega[0].double()).Q
    small = q.T @ w.double()
    ss = torch.linalg.svdvals(small)
    torch.testing.assert_close(s.double(), ss, atol=1e-5, rtol=1e-5)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="niter"):
            svd.randomized_top_r(w, 3, bad)
    u2, s2, _ = svd.randomized_top_r(w, 3, 0, torch.Generator().manual_seed(1), oversample=4)
    assert s2.shape == (3,) and not torch.allclose(s2, s)  # a 7-column range finder finds more of the spectrum


def test_orthonormalize_is_cholesky_qr_with_householder_fallback():
    y = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    q = svd.orthonormalize(y)
    torch.testing.assert_close(q.mT @ q, torch.eye(4, dtype=torch.float64).expand(2, 4, 4), atol=1e-12, rtol=0)
    r = q.mT @ y  # Cholesky-QR: y = Q R with R upper triangular, positive diagonal
    torch.testing.assert_close(r, torch.triu(r), atol=1e-12, rtol=0)
    assert bool((torch.diagonal(r, dim1=-2, dim2=-1) > 0).all())
    want = y @ torch.linalg.inv(torch.linalg.cholesky(y.mT @ y).mT)
    torch.testing.assert_close(q, want, atol=1e-10, rtol=0)
    deficient = torch.cat([y[..., :2], y[..., :2]], -1)  # rank 2 of 4 columns: Cholesky breaks down
    qd = svd.orthonormalize(deficient)
    torch.testing.assert_close(qd, torch.linalg.qr(deficient).Q, atol=1e-12, rtol=0)


def test_finish_right_and_left_agree():
    w = _w((1, 8, 5), 8).double()
    ev_r, vec_r = torch.linalg.eigh(w.mT @ w)
    ur, sr, vhr = svd._finish(w, ev_r, vec_r, 2, right=True)
    ev_l, vec_l = torch.linalg.eigh(w @ w.mT)
    ul, sl, vhl = svd._finish(w, ev_l, vec_l, 2, right=False)
    s64 = torch.linalg.svdvals(w)[..., :2]
    torch.testing.assert_close(sr, s64, atol=1e-10, rtol=0)
    torch.testing.assert_close(sl, s64, atol=1e-10, rtol=0)
    torch.testing.assert_close(ur @ torch.diag_embed(sr) @ vhr, ul @ torch.diag_embed(sl) @ vhl, atol=1e-10, rtol=0)
    zero = torch.zeros(1, 4, 3, dtype=torch.float64)  # zero singular values give zero vectors, never inf/NaN
    ev, vec = torch.linalg.eigh(zero.mT @ zero)
    u0, s0, _ = svd._finish(zero, ev, vec, 2, right=True)
    assert torch.equal(s0, torch.zeros(1, 2, dtype=torch.float64)) and torch.equal(u0, torch.zeros(1, 4, 2,
                                                                                               dtype=torch.float64))


def test_default_iterations_count_quantizer_calls():
    # 5 iterations by default: QPiSSA quantizes between iterations (4 times per matrix), LoftQ in each (5 times)
    w = _w((2, 6, 5), 9, decay=False)
    calls = []

    def q(m):
        calls.append(1)
        return torch.round(m * 4) / 4

    inits.qpissa_factors(w, 2, 1.0, q)
    assert len(calls) == 4 * 2
    calls.clear()
    inits.loftq_factors(w, 2, 1.0, q)
    assert len(calls) == 5 * 2
    calls.clear()
    inits.qpissa_factors(w, 2, 1.0, q, iters=1)  # one iteration: plain PiSSA, no quantization
    assert calls == []


def test_exact_top_r_uses_a_float64_gram_on_cpu():
    # a float64 weight wider than r + 16: the exact mode's float64 Gram gives the top triplets to ~1e-12
    g = torch.Generator().manual_seed(12)
    w = torch.randn(40, 30, generator=g, dtype=torch.float64)
    u, s, vh = svd.exact_top_r(w, 3)
    u64, s64, vh64 = torch.linalg.svd(w)
    torch.testing.assert_close(s, s64[:3], atol=1e-10, rtol=0)
    torch.testing.assert_close((u * s) @ vh, u64[:, :3] @ torch.diag(s64[:3]) @ vh64[:3], atol=1e-10, rtol=0)
