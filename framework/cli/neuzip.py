"""`python -m memfit.cli.neuzip stats <model dir> [--dtype bf16] [--mantissa-bits K]`: NeuZip compressibility.

Per float tensor: exponent entropy H (bits), the bound 1 + H + kept mantissa bits, the bits/weight NeuZip achieves
(every stream, table and header counted) and their ratio. Reads *.safetensors (or pytorch_model.bin) from the folder.
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from memfit.cli.errors import run_cli
from memfit.compression.safe_io import require_dir
from memfit.compression.safetensors_dir import parse, read_tensor
from memfit.quant import neuzip_codec as codec
from memfit.quant.neuzip import NeuZipTensor

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of a checkpoint folder (safetensors preferred), read one at a time, so a model
    larger than memory can be inspected. Headers are parsed by memfit's own reader (safetensors_dir), which names the
    file and the problem for an empty, truncated or corrupt file."""
    d = require_dir(model_dir, "model folder")
    files = sorted(p for p in d.rglob("*.safetensors") if p.is_file())
    if files:
        for f in files:
            for e in parse(f).tensors:
                yield e.name, read_tensor(e)
        return
    bins = sorted(p for p in d.rglob("pytorch_model*.bin") if p.is_file())
    if not bins:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin under {d}")
    for f in bins:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{f} is not a readable PyTorch checkpoint ({' '.join(str(e).split())[:200]})") from None
        if not isinstance(state, dict):
            raise ValueError(f"{f} holds a {type(state).__name__}, not a state dict")
        yield from ((k, v) for k, v in state.items() if isinstance(v, torch.Tensor))


def exponent_entropy(exps: torch.Tensor) -> float:
    p = torch.bincount(exps.long(), minlength=256).double()
    p = p[p > 0] / exps.numel()
    return float(-(p * p.log2()).sum())


def tensor_stats(w: torch.Tensor, mantissa_bits: int | None = None) -> dict[str, float]:
    """Entropy bound vs achieved size for one tensor (already in the target dtype)."""
    k = codec.check_mantissa_bits(w.dtype, mantissa_bits)
    exps, _, _ = codec.split(w, k)
    h = exponent_entropy(exps)
    z = NeuZipTensor.from_dense(w, mantissa_bits)
    bits = 8 * z.compressed_nbytes / w.numel()
    err = (z.dequantize().float() - w.float()).norm() / w.float().norm().clamp_min(1e-30)
    return {"numel": w.numel(), "H_exp": h, "bound": 1 + h + k, "bits": bits, "ratio": bits / (1 + h + k),
            "rel_err": float(err)}


def model_stats(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
                mantissa_bits: int | None = None, min_numel: int = 4096, progress: bool = False
                ) -> tuple[list[tuple[str, dict[str, float]]], dict[str, float]]:
    """Per-tensor stats of the float tensors with >= min_numel elements, and the weighted total."""
    from tqdm.auto import tqdm

    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    rows = [(name, tensor_stats(t.to(dtype), mantissa_bits))
            for name, t in tqdm(items, desc="neuzip stats", unit="tensor", disable=not progress)
            if t.is_floating_point() and t.numel() >= max(min_numel, 1)]
    if not rows:
        raise ValueError(f"no float tensor with at least {min_numel} elements to measure (see --min-numel)")
    n = sum(r["numel"] for _, r in rows)
    tot = {"numel": n}
    for key in ("H_exp", "bound", "bits"):
        tot[key] = sum(r[key] * r["numel"] for _, r in rows) / max(1, n)
    tot["ratio"] = tot["bits"] / tot["bound"] if tot["bound"] else math.nan
    sq = sum((r["rel_err"] ** 2) * r["numel"] for _, r in rows) / max(1, n)
    tot["rel_err"] = math.sqrt(sq)
    return rows, tot


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memfit.cli.neuzip")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stats", help="per-tensor entropy, achieved bits/weight, ratio vs bound")
    st.add_argument("model_dir")
    st.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    st.add_argument("--mantissa-bits", type=int, default=None, help="lossy: kept mantissa bits (default lossless)")
    st.add_argument("--min-numel", type=int, default=4096)
    st.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    return run_cli(lambda: _stats(a), "memfit.cli.neuzip")


def _stats(a: argparse.Namespace) -> None:
    rows, tot = model_stats(iter_tensors(a.model_dir), DTYPES[a.dtype], a.mantissa_bits, a.min_numel,
                            progress=not a.quiet)
    print(f"{'tensor':60s} {'numel':>10s} {'H(exp)':>7s} {'bound':>7s} {'bits':>7s} {'ratio':>6s} {'rel_err':>9s}")
    for name, r in [*rows, ("TOTAL", tot)]:
        name = "".join(c if c.isprintable() else "?" for c in name[:60])  # names come from the file
        print(f"{name:60s} {r['numel']:>10d} {r['H_exp']:7.3f} {r['bound']:7.3f} {r['bits']:7.3f} "
              f"{r['ratio']:6.3f} {r['rel_err']:9.2e}")


if __name__ == "__main__":
    sys.exit(main())
