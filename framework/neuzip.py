"""`python -m memfit.neuzip stats <model dir> [--dtype bf16] [--mantissa-bits K]`: NeuZip compressibility.

Per float tensor: exponent entropy H (bits), the bound 1 + H + kept mantissa bits, the bits/weight NeuZip achieves
(every stream, table and header counted) and their ratio. Reads *.safetensors (or pytorch_model.bin) from the folder.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from memfit.quant import neuzip_codec as codec
from memfit.quant.neuzip import NeuZipTensor

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of a checkpoint folder (safetensors preferred), read one at a time, so a model
    larger than memory can be inspected."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"model folder {d} does not exist")
    files = sorted(d.rglob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    yield k, fh.get_tensor(k)
        return
    bins = sorted(d.rglob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin under {d}")
    for f in bins:
        yield from torch.load(f, map_location="cpu", weights_only=True, mmap=True).items()


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
            if t.is_floating_point() and t.numel() >= min_numel]
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
    ap = argparse.ArgumentParser(prog="python -m memfit.neuzip")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stats", help="per-tensor entropy, achieved bits/weight, ratio vs bound")
    st.add_argument("model_dir")
    st.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    st.add_argument("--mantissa-bits", type=int, default=None, help="lossy: kept mantissa bits (default lossless)")
    st.add_argument("--min-numel", type=int, default=4096)
    st.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    try:
        rows, tot = model_stats(iter_tensors(a.model_dir), DTYPES[a.dtype], a.mantissa_bits, a.min_numel,
                                progress=not a.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{'tensor':60s} {'numel':>10s} {'H(exp)':>7s} {'bound':>7s} {'bits':>7s} {'ratio':>6s} {'rel_err':>9s}")
    for name, r in [*rows, ("TOTAL", tot)]:
        print(f"{name[:60]:60s} {r['numel']:>10d} {r['H_exp']:7.3f} {r['bound']:7.3f} {r['bits']:7.3f} "
              f"{r['ratio']:6.3f} {r['rel_err']:9.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
