"""experiments/ans_layout_proto.py under TRITON_INTERPRET=1: the grouped word layout built by simulating the decode,
and the prototype kernel with 8- and 4-byte tables, decode the library's streams back to the original symbols, so a
GPU run of the benchmark measures correct decoders only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = r'''
import torch
from experiments.ans_layout_proto import decode_proto, exponent_symbols, reads, to_groups, variants
from memfit.kernels.ans import ans_encode

g = torch.Generator().manual_seed(0)
streams = [exponent_symbols(3001, "cpu"), torch.randint(0, 7, (999,), generator=g).to(torch.uint8),
           torch.full((300,), 5, dtype=torch.uint8)]
for sym in streams:
    for lanes in (70, 64, 5):
        enc = ans_encode(sym, lanes=lanes)
        need = reads(enc)
        assert int(need.sum()) == enc.words.numel()  # the simulation consumes exactly the stream's words
        for g_, block in ((32, 64), (64, 64), (32, 32)):
            gw, gs = to_groups(enc, g_)
            assert torch.equal(gw.sort().values, enc.words.sort().values)  # a permutation of the same words
            for name, (w, s, t, grouped, gg) in variants(enc, block, g_).items():
                got = decode_proto(enc, w, s, t, grouped=grouped, g=gg, block=block, warps=1)
                assert torch.equal(got, sym), (name, lanes, g_, block)
print("OK")
'''


def test_prototype_decoders_are_exact_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-4000:]
