"""`python -m memfit.cli.neuzip stats`: per-tensor exponent entropy against an independent numpy count, achieved bits
against the compressed size of each tensor, weighted totals, streaming over several files, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from memfit.cli.neuzip import main, model_stats
from memfit.quant import NeuZipTensor


def _entropy_of_bf16_exponents(t: torch.Tensor) -> float:
    bits = t.to(torch.bfloat16).view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    _, counts = np.unique((bits >> 7) & 0xFF, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


@pytest.fixture
def model_dir(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ts = {"a.weight": 0.02 * torch.randn(96, 64, generator=g), "b.weight": torch.randn(64, 80, generator=g),
          "tiny.bias": torch.randn(8, generator=g), "ids": torch.arange(5000)}
    save_file({k: ts[k] for k in ("a.weight", "tiny.bias")}, tmp_path / "model-00001.safetensors")
    save_file({k: ts[k] for k in ("b.weight", "ids")}, tmp_path / "model-00002.safetensors")
    return tmp_path, ts


def test_stats_match_independent_counts(model_dir, capsys):
    d, ts = model_dir
    assert main(["stats", str(d), "--quiet", "--min-numel", "1000"]) == 0
    lines = {ln.split()[0]: ln.split()[1:] for ln in capsys.readouterr().out.splitlines()[1:]}
    assert set(lines) == {"a.weight", "b.weight", "TOTAL"}  # ints and tensors under --min-numel are skipped
    sizes = {}
    for name in ("a.weight", "b.weight"):
        numel, h, bound, bits, ratio, err = (float(x) for x in lines[name])
        w = ts[name].to(torch.bfloat16)
        assert numel == w.numel() and err == 0.0
        assert h == pytest.approx(_entropy_of_bf16_exponents(w), abs=1e-3)
        assert bound == pytest.approx(1 + h + 7, abs=2e-3)  # lossless bf16: sign + exponent entropy + 7 mantissa
        sizes[name] = NeuZipTensor.from_dense(w).compressed_nbytes
        assert bits == pytest.approx(8 * sizes[name] / w.numel(), abs=1e-3)
        assert ratio == pytest.approx(bits / bound, abs=2e-3)
    total_bits = float(lines["TOTAL"][3])
    assert total_bits == pytest.approx(8 * sum(sizes.values()) / (96 * 64 + 64 * 80), abs=1e-3)


def test_lossy_stats_report_the_weight_error(model_dir):
    d, ts = model_dir
    from memfit.cli.neuzip import iter_tensors

    rows, _ = model_stats(iter_tensors(d), torch.bfloat16, mantissa_bits=1, min_numel=1000)
    got = dict(rows)["b.weight"]
    w = ts["b.weight"].to(torch.bfloat16)
    ref = (NeuZipTensor.from_dense(w, 1).dequantize().float() - w.float()).norm() / w.float().norm()
    assert got["rel_err"] == pytest.approx(float(ref), rel=1e-6) and 0 < got["rel_err"] < 0.2
    assert got["bound"] == pytest.approx(1 + got["H_exp"] + 1)


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "missing"), "--quiet"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["stats", str(tmp_path), "--quiet"]) == 1
    assert "no *.safetensors" in capsys.readouterr().err
    save_file({"x": torch.randn(10)}, tmp_path / "m.safetensors")
    assert main(["stats", str(tmp_path), "--quiet"]) == 1
    assert "--min-numel" in capsys.readouterr().err
