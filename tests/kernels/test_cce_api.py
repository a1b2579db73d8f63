"""CCE API behaviour on CPU: bad inputs, non-contiguous inputs, autocast, torch.compile, the loss=cce integration."""

from __future__ import annotations

import pytest
import torch

from cce_common import error_bounds, make_inputs, reference
from memfit.kernels.cce import linear_cross_entropy

pytestmark = pytest.mark.usefixtures("cpu_triton")  # impl='triton' runs interpreted on CPU


def _inputs(seed=0):
    return make_inputs(12, 130, 16, "peaked", seed=seed, ignore_every=4)


@pytest.mark.parametrize("case, exc, match", [
    ("d_mismatch", ValueError, "hidden size mismatch"),
    ("target_high", ValueError, "outside \\[0, 130\\)"),
    ("target_negative", ValueError, "outside \\[0, 130\\)"),
    ("target_shape", ValueError, "targets shape"),
    ("target_float", TypeError, "integer"),
    ("dtype_mismatch", TypeError, "share a dtype"),
    ("wrong_device", ValueError, "one device"),
    ("bias_shape", ValueError, "bias must have shape"),
    ("reduction", ValueError, "choose one of: mean, sum, none"),
    ("smoothing", ValueError, "label_smoothing"),
    ("filter_eps", ValueError, "filter_eps"),
    ("softcap", ValueError, "softcap"),
    ("shift", ValueError, "shift"),
    ("impl", ValueError, "choose one of: auto, triton, torch"),
])
def test_bad_input_names_the_problem(case, exc, match):
    e, c, t = _inputs()
    kw = {}
    if case == "d_mismatch":
        c = c[:, :15]
    elif case == "target_high":
        t = t.clone()
        t[0] = 130
    elif case == "target_negative":
        t = t.clone()
        t[0] = -1
    elif case == "target_shape":
        t = t[:-1]
    elif case == "target_float":
        t = t.float()
    elif case == "dtype_mismatch":
        c = c.double()
    elif case == "wrong_device":
        c = c.to("meta")
    elif case == "bias_shape":
        kw["bias"] = torch.zeros(129)
    elif case == "reduction":
        kw["reduction"] = "avg"
    elif case == "smoothing":
        kw["label_smoothing"] = 1.5
    elif case == "filter_eps":
        kw["filter_eps"] = "fast"
    elif case == "softcap":
        kw["softcap"] = -1.0
    elif case == "shift":
        kw["shift"] = -1
    elif case == "impl":
        kw["impl"] = "cuda"
    with pytest.raises(exc, match=match):
        linear_cross_entropy(e, c, t, **kw)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_non_contiguous_inputs_give_the_contiguous_result(impl):
    e, c, t = _inputs(1)
    e_nc = torch.stack([e, e], dim=-1)[..., 0]  # strided view with the same values
    c_nc = c.T.contiguous().T
    assert not e_nc.is_contiguous() and not c_nc.is_contiguous()
    a = linear_cross_entropy(e, c, t, impl=impl)
    b = linear_cross_entropy(e_nc, c_nc, t, impl=impl)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_autocast_casts_like_a_matmul():
    """Under CPU autocast(bf16) fp32 inputs are computed as bf16, matching an explicit bf16 call."""
    e, c, t = _inputs(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(e, c, t)
    eb, cb = e.bfloat16(), c.bfloat16()
    want = linear_cross_entropy(eb, cb, t)
    assert torch.equal(got, want)
    # float64 on the bf16 inputs autocast made, within the kernel's rounding bound (tests/helpers/cce_common.py)
    assert abs(float(got) - float(reference(eb.double(), cb.double(), t)[0])) <= float(error_bounds(eb, cb, t)["loss"])


def test_torch_compile_fullgraph_matches_eager():
    e, c, t = _inputs(3)
    t = t.reshape(3, 4)
    e = e.reshape(3, 4, 16)

    def f(e_, c_):
        return linear_cross_entropy(e_, c_, t, shift=1, z_loss=1e-3, label_smoothing=0.1)

    grads = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        e_, c_ = e.clone().requires_grad_(), c.clone().requires_grad_()
        loss = fn(e_, c_)
        loss.backward()
        grads.append((loss.detach(), e_.grad, c_.grad))
    for a, b in zip(*grads):  # the same kernels on the same inputs: only fusion may reorder a few fp32 sums
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    opts = {"shift": 1, "z_loss": 1e-3, "label_smoothing": 0.1}
    gt = reference(e.double(), c.double(), t, **opts)[0]
    assert abs(float(grads[0][0]) - float(gt)) <= float(error_bounds(e, c, t, **opts)["loss"])


def test_custom_ops_pass_opcheck():
    from memfit.kernels.cce.ops import cce_forward

    e, c, t = _inputs(4)
    args = (e.requires_grad_(), c.requires_grad_(), None, t, -100, 0.0, 0.0, 0.0, 0.0, True, False, "torch")
    torch.library.opcheck(cce_forward, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_cut_cross_entropy_loss_class_matches_torch_loss_with_softcap():
    """memfit.loss.CutCrossEntropy == TorchCrossEntropy (same signature), with Gemma-2 style softcap and shift=1."""
    from memfit.loss import CutCrossEntropy, TorchCrossEntropy

    e, c, t = make_inputs(2 * 9, 130, 16, "flat", seed=5, ignore_every=5)
    hidden, labels = e.reshape(2, 9, 16), t.reshape(2, 9)
    bias = torch.randn(130)
    res = []
    for loss_fn in (TorchCrossEntropy(label_smoothing=0.1, z_loss=1e-3), CutCrossEntropy(label_smoothing=0.1, z_loss=1e-3)):
        h, w = hidden.clone().requires_grad_(), c.clone().requires_grad_()
        loss = loss_fn(h, w, labels, bias=bias, shift=1, softcap=30.0)
        loss.backward()
        res.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="loss.impl"):
        CutCrossEntropy(impl="gpu")


@pytest.mark.parametrize("row_blocks,v_tiles,slots", [(64, 1000, 132), (64, 2000, 132), (1, 1000, 132), (3, 7, 8),
                                                      (64, 1, 132)])
def test_forward_split_fills_the_waves(row_blocks, v_tiles, slots):
    """Tiles per program: every tile covered, and the launch wastes little of its last wave against the ideal
    row_blocks * v_tiles / slots tile-times (the old rule, splits = ceil(2 * slots / row_blocks), left 2.4 waves of
    320 programs on 132 SMs for the benchmark shape)."""
    from memfit.kernels.cce.fwd import split_tiles

    t = split_tiles(row_blocks, v_tiles, slots)
    splits = -(-v_tiles // t)
    assert 1 <= t <= v_tiles and splits * t >= v_tiles and (splits - 1) * t < v_tiles
    waves = -(-row_blocks * splits // slots)
    ideal = row_blocks * v_tiles / slots
    assert waves * t <= max(1.02 * ideal, ideal + 1)  # within 2% of the ideal (or of one tile, for tiny launches)
