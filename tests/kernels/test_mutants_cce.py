"""CCE reference and dispatch against dense float64 closed forms: logits materialised, log-sum-exp, target logit,
label smoothing, z-loss, softcap and its derivative written out by hand, the reductions, label/target shifting, the
chunked reference at chunk boundaries, and the loss classes' defaults. Written to kill the mutants
experiments/mutation.py found surviving."""

from __future__ import annotations

import pytest
import torch

from memfit.kernels.cce import auto_filter_eps, linear_cross_entropy, shift_targets
from memfit.kernels.cce import reference as ref
from memfit.loss import CutCrossEntropy, TorchCrossEntropy, shift_labels

IGN = -100


def _inputs(n=7, d=5, v=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    c = torch.randn(v, d, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(v, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    return e, c, bias, t


def dense_rows(e, c, t, bias=None, softcap=None, ls=0.0, zl=0.0, ignore=IGN):
    """Per-row loss in float64 from the materialised logits: lse - (1-ls) z_t - ls/V sum z + zl lse^2."""
    x = e.double() @ c.double().T + (0 if bias is None else bias.double())
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    lse = torch.logsumexp(z, dim=1)
    valid = t != ignore
    zt = z.gather(1, t.clamp(min=0)[:, None])[:, 0]
    row = lse - (1 - ls) * zt - ls / z.shape[1] * z.sum(1) + zl * lse ** 2
    return torch.where(valid, row, torch.zeros_like(row)), lse, z


def test_shift_helpers_known_answers():
    t = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert shift_labels(t, 1).tolist() == [[2, 3, 4, IGN], [6, 7, 8, IGN]]
    assert shift_labels(t, 2).tolist() == [[3, 4, IGN, IGN], [7, 8, IGN, IGN]]
    assert shift_labels(t, 0) is t
    assert shift_targets(t, 1, -1).tolist() == [[2, 3, 4, -1], [6, 7, 8, -1]]
    assert shift_targets(t, 3, -7).tolist() == [[4, -7, -7, -7], [8, -7, -7, -7]]
    assert shift_targets(t, 9, -1).tolist() == [[-1] * 4, [-1] * 4]  # longer than the sequence: all ignored
    assert shift_targets(t, 0, -1) is t
    one = torch.tensor([1, 2, 3])  # 1-D and 3-D targets shift along their last dimension
    assert shift_targets(one, 1, -1).tolist() == [2, 3, -1] and shift_labels(one, 2).tolist() == [3, IGN, IGN]
    three = torch.arange(8).reshape(2, 2, 2)
    assert shift_targets(three, 1, -1).tolist() == [[[1, -1], [3, -1]], [[5, -1], [7, -1]]]
    assert shift_labels(three, 1).tolist() == [[[1, IGN], [3, IGN]], [[5, IGN], [7, IGN]]]
    assert auto_filter_eps(torch.bfloat16) == 2.0 ** -7 / 32 and auto_filter_eps(torch.float16) == 2.0 ** -10 / 32
    assert auto_filter_eps(torch.float32) == 0.0 and auto_filter_eps(torch.float64) == 0.0


@pytest.mark.parametrize("opts", [{}, {"softcap": 2.5}, {"label_smoothing": 0.2}, {"z_loss": 0.01},
                                  {"softcap": 0.5, "label_smoothing": 0.1, "z_loss": 0.001}])
def test_reductions_and_options_against_float64(opts):
    e, c, bias, t = _inputs()
    t[2] = IGN
    rows, lse, _ = dense_rows(e, c, t, bias, opts.get("softcap"), opts.get("label_smoothing", 0.0),
                              opts.get("z_loss", 0.0))
    kw = dict(bias=bias, **opts)
    none, got_lse = linear_cross_entropy(e, c, t, reduction="none", return_lse=True, **kw)
    torch.testing.assert_close(none, rows, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_lse, lse, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(linear_cross_entropy(e, c, t, reduction="sum", **kw), rows.sum(), atol=1e-12, rtol=0)
    torch.testing.assert_close(linear_cross_entropy(e, c, t, **kw), rows.sum() / 6, atol=1e-12, rtol=0)
    # gradients against autograd through the dense float64 formula
    e1, c1, b1 = (x.clone().requires_grad_(True) for x in (e, c, bias))
    linear_cross_entropy(e1, c1, t, bias=b1, **opts).backward()
    e2, c2, b2 = (x.clone().requires_grad_(True) for x in (e, c, bias))
    (dense_rows(e2, c2, t, b2, opts.get("softcap"), opts.get("label_smoothing", 0.0),
                opts.get("z_loss", 0.0))[0].sum() / 6).backward()
    for got, want in ((e1.grad, e2.grad), (c1.grad, c2.grad), (b1.grad, b2.grad)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_shift_and_batched_shape():
    e, c, _, _ = _inputs(n=12)
    t = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(1))
    e3 = e.reshape(3, 4, 5)
    rows, _, _ = dense_rows(e, c, shift_targets(t, 1, IGN).reshape(-1))
    out = linear_cross_entropy(e3, c, t, shift=1, reduction="none")
    assert out.shape == (3, 4)
    torch.testing.assert_close(out.reshape(-1), rows, atol=1e-12, rtol=0)
    torch.testing.assert_close(linear_cross_entropy(e3, c, t, shift=True), rows.sum() / 9, atol=1e-12, rtol=0)
    ignored = torch.full((3, 4), IGN)
    assert float(linear_cross_entropy(e3, c, ignored)) == 0.0


def test_autocast_off_keeps_float64_and_on_casts():
    e, c, _, t = _inputs()
    rows, _, _ = dense_rows(e, c, t)
    got = linear_cross_entropy(e, c, t, reduction="none")  # no autocast: computed in float64
    torch.testing.assert_close(got, rows, atol=1e-13, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = linear_cross_entropy(e.float(), c.float(), t, reduction="none")
    eb, cb = e.to(torch.bfloat16), c.to(torch.bfloat16)
    torch.testing.assert_close(low.double(), dense_rows(eb, cb, t)[0], atol=1e-4, rtol=1e-4)


def test_argument_edges_accepted():
    e, c, bias, t = _inputs()
    rows, _, _ = dense_rows(e, c, t, softcap=0.5)
    torch.testing.assert_close(linear_cross_entropy(e, c, t, softcap=0.5, reduction="none"), rows, atol=1e-12, rtol=0)
    linear_cross_entropy(e[0], c, t[0])  # e of one dimension (D,): one token
    linear_cross_entropy(e, c, t, filter_eps=0)
    linear_cross_entropy(e, c, t, filter_eps=None)
    linear_cross_entropy(e, c, t, label_smoothing=0.0, z_loss=0.0)
    for bad in [{"softcap": 0.0}, {"softcap": -1.0}, {"label_smoothing": 1.0}, {"z_loss": -0.1},
                {"filter_eps": -1.0}, {"filter_eps": "x"}, {"shift": -1}, {"reduction": "max"}]:
        with pytest.raises(ValueError):
            linear_cross_entropy(e, c, t, **bad)
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(e, c, t, bias=bias[:-1])


@pytest.mark.parametrize("budget", [7 * 3, 7 * 4, 7, 10 ** 6])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_reference_against_dense(budget, softcap):
    e, c, bias, t = _inputs()
    t[0], t[1], t[2], t[3] = 0, 10, -1, 3  # first and last column, no target, a chunk boundary (chunks of 3)
    x = e @ c.T + bias
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    lse, tl, sz = ref.stats_torch(e, c, bias, t, softcap, True, budget=budget)
    torch.testing.assert_close(lse, torch.logsumexp(z, 1), atol=1e-12, rtol=0)
    want_t = torch.where(t >= 0, z.gather(1, t.clamp(min=0)[:, None])[:, 0], torch.zeros(7, dtype=torch.float64))
    torch.testing.assert_close(tl, want_t, atol=1e-12, rtol=0)
    torch.testing.assert_close(sz, z.sum(1), atol=1e-12, rtol=0)
    g = torch.Generator().manual_seed(9)
    a, b, u = (torch.rand(7, generator=g, dtype=torch.float64) for _ in range(3))
    p = torch.exp(z - torch.logsumexp(z, 1)[:, None])
    onehot = torch.zeros_like(z)
    onehot[t >= 0, t[t >= 0]] = 1.0
    for uu in (None, u):
        d = a[:, None] * p - b[:, None] * onehot - (0 if uu is None else uu[:, None])
        if softcap is not None:
            d = d * (1 - torch.tanh(x / softcap) ** 2)  # d/dx of s tanh(x/s)
        de, dc, db = ref.grad_torch(e, c, bias, t, lse, a, b, uu, softcap, budget=budget)
        torch.testing.assert_close(de, d @ c, atol=1e-12, rtol=0)
        torch.testing.assert_close(dc, d.T @ e, atol=1e-12, rtol=0)
        torch.testing.assert_close(db, d.sum(0), atol=1e-12, rtol=0)
    _, _, none_db = ref.grad_torch(e, c, None, t, lse, a, b, None, softcap, budget=budget)
    assert none_db is None
    assert ref.stats_torch(e, c, None, t, None, False, budget=budget)[2].abs().sum() == 0  # sumz not asked for


def test_reference_helpers():
    assert ref.compute_dtype(torch.float64) == torch.float64
    assert ref.compute_dtype(torch.bfloat16) == torch.float32 and ref.compute_dtype(torch.float16) == torch.float32
    assert [ref._chunk_v(n, v, b) for n, v, b in [(4, 10, 8), (4, 10, 1000), (4, 10, 3), (0, 10, 5), (3, 10, 9)]] == \
        [2, 10, 1, 5, 3]
    x = torch.tensor([-3.0, 0.5, 10.0], dtype=torch.float64)
    assert torch.equal(ref.softcap_fn(x, None), x) and torch.equal(ref.softcap_fn(x, 0.0), x)
    torch.testing.assert_close(ref.softcap_fn(x, 2.0), 2.0 * torch.tanh(x / 2.0), atol=0, rtol=0)
    e, c, bias, _ = _inputs()
    capped, raw = ref._logits(e, c, bias, 2, 6, 1.5)
    torch.testing.assert_close(raw, e @ c[2:6].T + bias[2:6], atol=1e-14, rtol=0)
    torch.testing.assert_close(capped, 1.5 * torch.tanh(raw / 1.5), atol=1e-14, rtol=0)
    low, _ = ref._logits(e.float(), c.float(), None, 0, 11, None)
    assert low.dtype == torch.float32


def _close(loss, got, want):
    """TorchCrossEntropy computes the logits in fp32 (.float()); the fused path keeps float64."""
    tol = 1e-5 if isinstance(loss, TorchCrossEntropy) else 1e-12
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)


def test_loss_classes_against_float64():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    labels[0, 2] = IGN
    tgt = shift_labels(labels, 1).reshape(-1)
    rows, _, _ = dense_rows(h.reshape(-1, 4), w, tgt)
    want = rows.sum() / (tgt != IGN).sum()
    for loss in (TorchCrossEntropy(), CutCrossEntropy()):
        _close(loss, loss(h, w, labels), want)
        _close(loss, loss(h, w, labels, softcap=0.0), want)  # 0 = no cap
    capped = dense_rows(h.reshape(-1, 4), w, tgt, softcap=1.5)[0].sum() / (tgt != IGN).sum()
    for loss in (TorchCrossEntropy(), CutCrossEntropy()):
        _close(loss, loss(h, w, labels, softcap=1.5), capped)
    opts = dict(label_smoothing=0.1, z_loss=0.02)
    smooth = dense_rows(h.reshape(-1, 4), w, tgt, ls=0.1, zl=0.02)[0].sum() / (tgt != IGN).sum()
    for loss in (TorchCrossEntropy(**opts), CutCrossEntropy(**opts)):
        _close(loss, loss(h, w, labels), smooth)
    unshifted = dense_rows(h.reshape(-1, 4), w, labels.reshape(-1))[0].sum() / 9
    for loss in (TorchCrossEntropy(), CutCrossEntropy()):
        _close(loss, loss(h, w, labels, shift=0), unshifted)
    b = torch.randn(9, generator=g, dtype=torch.float64)
    biased = dense_rows(h.reshape(-1, 4), w, tgt, bias=b)[0].sum() / (tgt != IGN).sum()
    for loss in (TorchCrossEntropy(), CutCrossEntropy()):
        _close(loss, loss(h, w, labels, bias=b), biased)
    ignored = torch.full_like(labels, IGN)
    hh = h.clone().requires_grad_(True)
    out = TorchCrossEntropy()(hh, w, ignored)
    out.backward()
    assert float(out) == 0.0 and float(hh.grad.abs().sum()) == 0.0
    lab7 = torch.where(labels == IGN, 7, labels).reshape(-1)  # ignore_index 7: those rows drop out of the mean
    rows7, _, _ = dense_rows(h.reshape(-1, 4), w, lab7, ignore=7)
    want7 = rows7.sum() / (lab7 != 7).sum()
    for loss in (TorchCrossEntropy(ignore_index=7), CutCrossEntropy(ignore_index=7)):
        _close(loss, loss(h, w, lab7.reshape(2, 5), shift=0), want7)


def test_rank_checks_of_e_and_c():
    e, c, _, t = _inputs()
    with pytest.raises(ValueError, match="expected e"):
        linear_cross_entropy(torch.tensor(1.0, dtype=torch.float64), c, torch.tensor(0))
    with pytest.raises(ValueError, match="expected e"):
        linear_cross_entropy(e, c[0], t)
    with pytest.raises(ValueError, match="expected e"):
        linear_cross_entropy(e, c[None], t)
