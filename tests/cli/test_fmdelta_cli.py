"""FM-Delta CLI end to end on small HF model directories: byte-identical rebuild that loads with transformers."""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memfit.cli.fmdelta import main


def make_pair(root: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1)
    model = LlamaForCausalLM(cfg).to(dtype)
    base, ft = root / "base", root / "ft"
    model.save_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p).sign())
        model.model.layers[0].mlp.up_proj.weight[0, :5] = torch.tensor([float("nan"), -0.0, float("inf"), 1e-40, 0.0])
    model.save_pretrained(ft)
    (ft / "notes.txt").write_text("extra file kept as is\n")
    return base, ft


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compress_decompress_bit_exact(tmp_path: Path, dtype: torch.dtype, capsys) -> None:
    base, ft = make_pair(tmp_path, dtype)
    delta, out = tmp_path / "d.fmd", tmp_path / "out"
    assert main(["compress", "--base", str(base), "--finetuned", str(ft), "--out", str(delta), "--quiet"]) == 0
    raw = sum(p.stat().st_size for p in ft.rglob("*") if p.is_file())
    assert delta.stat().st_size < 0.8 * raw
    assert main(["decompress", "--base", str(base), "--delta", str(delta), "--out", str(out), "--quiet"]) == 0
    cmp = filecmp.dircmp(ft, out)
    assert not cmp.left_only and not cmp.right_only
    for name in cmp.common_files:
        assert (ft / name).read_bytes() == (out / name).read_bytes(), name
    a = LlamaForCausalLM.from_pretrained(ft, dtype=dtype).state_dict()
    b = LlamaForCausalLM.from_pretrained(out, dtype=dtype).state_dict()
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    assert main(["verify", "--base", str(base), "--delta", str(delta), "--finetuned", str(ft), "--quiet"]) == 0
    assert main(["stats", "--delta", str(delta)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.mlp.up_proj.weight" in text and "TOTAL" in text


def test_wrong_base_and_corruption_fail_clearly(tmp_path: Path, capsys) -> None:
    base, ft = make_pair(tmp_path, torch.float32)
    delta = tmp_path / "d.fmd"
    assert main(["compress", "--base", str(base), "--finetuned", str(ft), "--out", str(delta), "--quiet"]) == 0
    other = tmp_path / "other"
    shutil.copytree(ft, other)  # same structure, other weights
    assert main(["decompress", "--base", str(other), "--delta", str(delta), "--out", str(tmp_path / "x"),
                 "--quiet"]) == 1
    assert "wrong base model" in capsys.readouterr().err
    blob = bytearray(delta.read_bytes())
    (tmp_path / "cut.fmd").write_bytes(bytes(blob[: len(blob) - 50]))
    assert main(["verify", "--base", str(base), "--delta", str(tmp_path / "cut.fmd"), "--quiet"]) == 1
    assert "truncated" in capsys.readouterr().err
    blob[len(blob) // 2] ^= 4
    (tmp_path / "flip.fmd").write_bytes(bytes(blob))
    assert main(["verify", "--base", str(base), "--delta", str(tmp_path / "flip.fmd"), "--quiet"]) == 1
    assert "corrupt" in capsys.readouterr().err


def test_failed_runs_leave_no_partial_output(tmp_path: Path, capsys) -> None:
    """A decompress against the wrong base writes nothing into --out and keeps what was there; a compress that fails
    midway (a corrupt safetensors file) leaves no truncated delta and keeps the previous one."""
    base, ft = make_pair(tmp_path, torch.float32)
    delta, out = tmp_path / "d.fmd", tmp_path / "out"
    assert main(["compress", "--base", str(base), "--finetuned", str(ft), "--out", str(delta), "--quiet"]) == 0
    good = delta.read_bytes()
    other = tmp_path / "other"
    shutil.copytree(ft, other)
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous model")
    assert main(["decompress", "--base", str(other), "--delta", str(delta), "--out", str(out), "--quiet"]) == 1
    assert "wrong base model" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name] == []
    # the same delta against the right base then replaces the old file with the rebuilt one
    assert main(["decompress", "--base", str(base), "--delta", str(delta), "--out", str(out), "--quiet"]) == 0
    assert (out / "model.safetensors").read_bytes() == (ft / "model.safetensors").read_bytes()

    bad = tmp_path / "bad"
    shutil.copytree(ft, bad)
    (bad / "zz-broken.safetensors").write_bytes(b"\xff" * 64)  # after model.safetensors in the walk order
    assert main(["compress", "--base", str(base), "--finetuned", str(bad), "--out", str(delta), "--quiet"]) == 1
    capsys.readouterr()
    assert delta.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name] == []
