"""Fused NF4 dequant-matmul (kernels/nf4/matmul.py): the Triton kernel under TRITON_INTERPRET=1 at tiny sizes, both
directions, split-K and double quantization, against a float64 product on the independently dequantized weight
(elementwise within the fp32-accumulation and output-rounding bound of tests/helpers/rounding.py); and the dispatch in
`F.linear` (pure-torch twin on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from interp import interpreted
from memfit.kernels.nf4 import NF4_CODE, unpack_nibbles
from memfit.kernels.nf4.matmul import candidate_configs, nf4_matmul_reference
from memfit.quant import NF4Tensor
from memfit.quant.nf4_double import dynamic_code
from rounding import assert_within, matmul_bound

ROOT = Path(__file__).resolve().parents[2]
CODE64 = torch.tensor(NF4_CODE, dtype=torch.float64)


def dense_f64(q: NF4Tensor) -> torch.Tensor:
    """Independent float64 weight from the stored codes and (decoded) scales, rounded like the kernel to q.dtype."""
    n = q.numel()
    codes = unpack_nibbles(q.packed)[:n].long()
    w = CODE64[codes] * q.fp32_absmax().double().repeat_interleave(q.block_size)[:n]
    return w.to(q.dtype).double().reshape(q.shape)




def within(out: torch.Tensor, a: torch.Tensor, q: NF4Tensor, ref: torch.Tensor, trans: bool = False,
           interpreted: bool = True) -> float:
    """out = a @ W^T (a @ W if trans) within the rounding bound of its fp32 accumulation and output dtype (the
    interpreted kernel's bf16 casts truncate: tests/helpers/rounding.py)."""
    w = dense_f64(q)
    return assert_within(out, ref, matmul_bound(a, w if trans else w.t(), ref, out.dtype, interpreted=interpreted))


def product(seed: int, m: int, n: int, k: int, trans: bool, block_size: int = 64, double_quant: bool = False
            ) -> tuple[NF4Tensor, torch.Tensor, torch.Tensor]:
    """(NF4 weight [n, k], bf16 input a, float64 reference a @ W^T or a @ W on the dequantized weight)."""
    g = torch.Generator().manual_seed(seed)
    q = NF4Tensor.from_dense(torch.randn(n, k, generator=g).to(torch.bfloat16), block_size, double_quant=double_quant)
    a = torch.randn(m, n if trans else k, generator=g).to(torch.bfloat16)
    w64 = dense_f64(q)
    return q, a, (a.double() @ w64 if trans else a.double() @ w64.t())


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m,n,k,block_size", [(1, 48, 96, 64), (5, 40, 70, 32), (17, 32, 64, 64)])
def test_interpreted_kernel_matches_float64(trans, double_quant, split, m, n, k, block_size):
    mod = interpreted("nf4/matmul.py")
    q, a, ref = product(m * 1000 + n + k + split, m, n, k, trans, block_size, double_quant)
    cfg = mod.MMConfig(tn=16, tkb=16, split=split, warps=1, stages=1)
    code8 = dynamic_code("cpu") if double_quant else None
    outs = []
    for _ in range(2):  # a second call checks the split-K tile counters were left zeroed
        out = mod.nf4_matmul(a, q.packed, q.scale_tensors(), q.offset, n, k, block_size, trans, code8, cfg)
        assert out.dtype == torch.bfloat16 and out.shape == ref.shape
        within(out, a, q, ref, trans)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])  # split-K sums its partials in a fixed order
    if split > 1:
        assert not mod._WS[torch.device("cpu")][1].any()


def test_interpreted_kernel_strided_input_and_fp16():
    mod = interpreted("nf4/matmul.py")
    g = torch.Generator().manual_seed(7)
    q = NF4Tensor.from_dense(torch.randn(32, 64, generator=g).half())
    a = torch.randn(64, 3, generator=g).half().t()  # non-contiguous rows
    cfg = mod.MMConfig(tn=16, tkb=16, split=2, warps=1, stages=1)
    out = mod.nf4_matmul(a, q.packed, q.scale_tensors(), None, 32, 64, 64, False, None, cfg)
    assert out.dtype == torch.float16
    within(out, a, q, a.double() @ dense_f64(q).t())


def test_reference_twin_and_configs():
    g = torch.Generator().manual_seed(8)
    q = NF4Tensor.from_dense(torch.randn(24, 40, generator=g).bfloat16())
    a = torch.randn(3, 40, generator=g).bfloat16()
    out = nf4_matmul_reference(a, q.packed, q.absmax, 24, 40, 64)
    within(out, a, q, a.double() @ dense_f64(q).t(), interpreted=False)
    for trans in (False, True):
        for c in candidate_configs(14336, 4096, trans, 132):
            assert c.split >= 1 and c.split & (c.split - 1) == 0


def test_linear_no_grad_and_grad_paths_agree_on_cpu():
    g = torch.Generator().manual_seed(9)
    q = NF4Tensor.from_dense(torch.randn(48, 80, generator=g).bfloat16())
    x = torch.randn(2, 3, 80, generator=g).bfloat16()
    with torch.no_grad():
        y0 = F.linear(x, q)
    xg = x.clone().requires_grad_(True)
    y1 = F.linear(xg, q)
    assert y1.requires_grad and torch.equal(y0, y1.detach())
    within(y0.reshape(-1, 48), x.reshape(-1, 80), q, (x.double() @ dense_f64(q).t()).reshape(-1, 48),
           interpreted=False)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("kind,m,n,k,block_size,trans", [
    (kind, *shape) for kind in ("gemv", "blocked")
    for shape in ((1, 48, 128, 64, False), (5, 40, 96, 32, False), (16, 24, 64, 64, False), (1, 40, 128, 64, True),
                  (1, 37, 96, 32, True), (6, 40, 128, 64, True))
    if not (kind == "gemv" and shape[-1] and shape[0] > 1)])  # the transposed GEMV serves one row (gemv_ok)
def test_interpreted_block_tiled_kernels_match_float64(double_quant, split, kind, m, n, k, block_size, trans):
    """The kernels that load one scale per block ([rows, blocks, bytes] tiles): the tensor-core-free GEMV (forward
    few rows, backward one row) and the tl.dot kernel in its blocked variant, against the same float64 product."""
    mod = interpreted("nf4/matmul.py")
    q, a, ref = product(m * 100 + n + k + split, m, n, k, trans, block_size, double_quant)
    cfg = mod.MMConfig(tn=16 if kind == "blocked" else 8, tkb=max(16, block_size // 2), split=split, warps=1,
                       gemv=kind == "gemv", blocked=kind == "blocked")
    code8 = dynamic_code("cpu") if double_quant else None
    outs = [mod.nf4_matmul(a, q.packed, q.scale_tensors(), q.offset, n, k, block_size, trans, code8, cfg)
            for _ in range(2)]
    assert outs[0].shape == ref.shape
    within(outs[0], a, q, ref, trans)
    assert torch.equal(outs[0], outs[1])
    if split > 1:
        assert not mod._WS[torch.device("cpu")][1].any()


def test_block_tiled_configs_reject_shapes_they_cannot_serve():
    mod = interpreted("nf4/matmul.py")
    q = NF4Tensor.from_dense(torch.randn(8, 96).bfloat16())  # 96 % 64 != 0: a scale block straddles two rows
    a = torch.randn(1, 96).bfloat16()
    for cfg, msg in ((mod.MMConfig(tn=8, tkb=32, split=1, warps=1, gemv=True), "GEMV config"),
                     (mod.MMConfig(tn=16, tkb=32, split=1, warps=1, blocked=True), "blocked config")):
        with pytest.raises(ValueError, match=msg):
            mod.nf4_matmul(a, q.packed, q.scale_tensors(), None, 8, 96, 64, False, None, cfg)
    assert not any(c.gemv or c.blocked for c in candidate_configs(4096, 96, False, 132, m=1))
    assert any(c.gemv for c in candidate_configs(4096, 4096, False, 132, m=16))
    assert any(c.gemv for c in candidate_configs(4096, 4096, True, 132, m=1))
    assert not any(c.gemv for c in candidate_configs(4096, 4096, True, 132, m=2))
    assert any(c.blocked for c in candidate_configs(4096, 4096, True, 132, m=2))


@pytest.mark.parametrize("trans,tn,tkb,split,pairs", [(False, 4, 256, 1, False), (False, 4, 256, 2, True),
                                                      (False, 8, 512, 1, False), (True, 8, 256, 1, True),
                                                      (True, 8, 256, 4, False)])
def test_interpreted_wide_gemv_tiles_match_float64(trans, tn, tkb, split, pairs):
    """The wide GEMV tiles of the autotune (a few rows over many scale blocks per step, plain and shallow), also
    with the pair-table lookup (both nibbles of a byte from one 8-byte gather)."""
    mod = interpreted("nf4/matmul.py")
    n, k = 40, 1024  # 512 bytes a row: one or two steps per program, a partial last row tile
    q, a, ref = product(tn + tkb + split, 1, n, k, trans)
    cfg = mod.MMConfig(tn=tn, tkb=tkb, split=split, warps=1, gemv=True, pairs=pairs)
    out = mod.nf4_matmul(a, q.packed, q.scale_tensors(), q.offset, n, k, 64, trans, None, cfg)
    assert out.shape == ref.shape
    within(out, a, q, ref, trans)
    # the same dequantized weight whichever table the nibbles come from: equal to the 16-entry lookup bit for bit
    plain = mod.nf4_matmul(a, q.packed, q.scale_tensors(), q.offset, n, k, 64, trans, None,
                           mod.MMConfig(tn=tn, tkb=tkb, split=split, warps=1, gemv=True))
    assert torch.equal(out, plain)
    assert any(c.gemv and c.tkb >= 512 for c in mod.candidate_configs(4096, 4096, trans, 132, m=1))


@pytest.mark.parametrize("double_quant", [False, True])
def test_interpreted_blocked_pair_table_equals_code_table(double_quant):
    """The blocked tl.dot kernel with the pair table gives the same bits as with the 16-entry code table."""
    mod = interpreted("nf4/matmul.py")
    g = torch.Generator().manual_seed(3)
    q = NF4Tensor.from_dense(torch.randn(40, 128, generator=g).to(torch.bfloat16), 64, double_quant=double_quant)
    code8 = dynamic_code("cpu") if double_quant else None
    for trans in (False, True):
        a = torch.randn(5, 40 if trans else 128, generator=g).to(torch.bfloat16)
        outs = [mod.nf4_matmul(a, q.packed, q.scale_tensors(), q.offset, 40, 128, 64, trans, code8,
                               mod.MMConfig(tn=16, tkb=32, split=2, warps=1, blocked=True, pairs=p))
                for p in (False, True)]
        assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="pair-table"):
        mod.nf4_matmul(a, q.packed, q.scale_tensors(), q.offset, 40, 128, 64, True, code8,
                       mod.MMConfig(tn=16, tkb=32, split=1, warps=1, pairs=True))


def test_code_pairs_table_against_code_table():
    from memfit.kernels.nf4 import NF4_CODE, nf4_code_pairs

    pairs = nf4_code_pairs()
    lo = (pairs & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    hi = (pairs >> 32).to(torch.int32).view(torch.float32)
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    b = torch.arange(256)
    assert torch.equal(lo, code[b >> 4]) and torch.equal(hi, code[b & 15])
