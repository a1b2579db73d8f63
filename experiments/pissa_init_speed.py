"""PiSSA init speed (GPU): ours (batched Gram-eigh exact / batched randomized) vs peft's `pissa` / `pissa_niter_4` on
the same random bf16 Llama-3-8B-shaped weights, starting (a) on the GPU and (b) in CPU memory.

    python experiments/pissa_init_speed.py                  # full run on a GPU (32 layers)
    python experiments/pissa_init_speed.py --small          # CPU smoke run at toy sizes

peft's slow modes (exact on GPU, anything on CPU) are timed on a subset of layers/matrices and extrapolated linearly
to 32 layers; the results file says which numbers are extrapolated.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch import nn

from memfit.adapters.inject import AdapterSpec, inject
from memfit.adapters.layer import adapter_layers

NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shapes(hidden: int, kv: int, inter: int) -> dict[str, tuple[int, int]]:
    return {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def make_weights(n_layers: int, shp: dict[str, tuple[int, int]], device: str) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator(device).manual_seed(0)
    return [{k: (torch.randn(s, generator=g, device=device, dtype=torch.bfloat16) * 0.02) for k, s in shp.items()}
            for _ in range(n_layers)]


def build(weights: list[dict[str, torch.Tensor]], clone: bool = True) -> nn.Module:
    """A module tree `layers.i.<name>` of bias-free Linears holding (copies of) the given weights."""
    root = nn.Module()
    root.layers = nn.ModuleList()
    for ws in weights:
        blk = nn.Module()
        for k, w in ws.items():
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            lin.weight = nn.Parameter(w.clone() if clone else w, requires_grad=False)
            setattr(blk, k, lin)
        root.layers.append(blk)
    return root


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ours(weights, r: int, niter: int | None, batch: int) -> tuple[float, nn.Module]:
    model = build(weights)
    sync()
    t = time.perf_counter()
    inject(model, AdapterSpec(init="pissa", rank=r, alpha=r, targets=list(NAMES), niter=niter, init_device="auto",
                              init_batch=batch, progress=False))
    sync()
    return time.perf_counter() - t, model


def time_peft(weights, r: int, mode: str, names=NAMES) -> tuple[float, nn.Module]:
    from peft import LoraConfig, inject_adapter_in_model

    model = build([{k: ws[k] for k in names} for ws in weights])
    sync()
    t = time.perf_counter()
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=list(names), init_lora_weights=mode), model)
    sync()
    return time.perf_counter() - t, model


def truncation(w: torch.Tensor, r: int) -> torch.Tensor:
    """Exact rank-r truncation in float64 (the reference)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def errors(model: nn.Module, w: torch.Tensor, ref: torch.Tensor, path: str, peft: bool) -> tuple[float, float]:
    """(||W_res + sBA - W|| / ||W||, ||sBA - W_r|| / ||W_r||) for one layer."""
    mod = model.get_submodule(path)
    if peft:
        a, b, s = mod.lora_A["default"].weight, mod.lora_B["default"].weight, mod.scaling["default"]
        base = mod.base_layer.weight
    else:
        a, b, s, base = mod.lora_A, mod.lora_B, mod.scaling, mod.base_layer.weight
    dev = ref.device
    delta = s * (b.to(dev).double() @ a.to(dev).double())
    return rel(base.to(dev).double() + delta, w.to(dev)), rel(delta, ref)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="toy sizes (CPU smoke run)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--peft-exact-layers", type=int, default=2)
    ap.add_argument("--peft-cpu-layers", type=int, default=1)
    ap.add_argument("--out", default="experiments/results/pissa_init_speed.md")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dims = (256, 64, 896) if args.small else (4096, 1024, 14336)
    r = 16 if args.small else args.rank
    n = 4 if args.small else args.layers
    shp = shapes(*dims)
    dev = "cuda" if cuda else "cpu"
    gpu_w = make_weights(n, shp, dev)
    print(f"weights: {n} layers, {sum(w.numel() for ws in gpu_w for w in ws.values()) / 1e9:.2f} G params bf16", flush=True)
    # warm-up (handles, kernels) on one layer
    time_ours(gpu_w[:1], r, 4, args.batch)
    time_ours(gpu_w[:1], r, None, args.batch)
    time_peft(gpu_w[:1], r, "pissa_niter_4", ("k_proj",))
    rows: list[tuple[str, str, float, str]] = []
    err: dict[str, tuple[float, float]] = {}
    ref_paths = ("layers.0.q_proj", "layers.0.k_proj")
    refs = {p: truncation(gpu_w[0][p.split(".")[-1]].float(), r) for p in ref_paths}

    def record(label: str, placement: str, sec: float, how: str, model: nn.Module, peft: bool) -> None:
        rows.append((label, placement, sec, how))
        for p in ref_paths:
            name = p.split(".")[-1]
            e = errors(model, gpu_w[0][name], refs[p], p, peft)
            err[f"{label} ({placement}) {name}"] = e
        print(f"{label:24s} {placement:4s} {sec:9.2f} s  {how}", flush=True)
        write(args.out, rows, err, n, r, dims, echo=False)  # partial results survive a time limit

    # (a) weights on the GPU
    for label, niter in (("ours niter=4", 4), ("ours exact", None)):
        sec, model = time_ours(gpu_w, r, niter, args.batch)
        record(label, "gpu", sec, "measured", model, False)
        del model
    sec, model = time_peft(gpu_w, r, "pissa_niter_4")
    record("peft pissa_niter_4", "gpu", sec, "measured", model, True)
    del model
    k = min(args.peft_exact_layers, n)
    sec, model = time_peft(gpu_w[:k], r, "pissa")
    record("peft pissa (exact)", "gpu", sec * n / k, f"{k} layers measured ({sec:.1f} s), x{n / k:g}", model, True)
    del model
    # (b) weights in CPU memory
    cpu_w = [{kk: w.cpu() for kk, w in ws.items()} for ws in gpu_w] if cuda else gpu_w
    for label, niter in (("ours niter=4", 4), ("ours exact", None)):
        sec, model = time_ours(cpu_w, r, niter, args.batch)
        assert next(iter(adapter_layers(model).values())).base_layer.weight.device.type == "cpu"
        record(label, "cpu", sec, "measured (GPU compute, weights stay in CPU memory)" if cuda else "measured", model, False)
        del model
    k = min(args.peft_cpu_layers, n)
    sec, model = time_peft(cpu_w[:k], r, "pissa_niter_4")
    record("peft pissa_niter_4", "cpu", sec * n / k, f"{k} layer(s) measured ({sec:.1f} s), x{n / k:g}", model, True)
    del model
    # peft exact on CPU: one matrix of each shape class, then layer = 2 q + 2 k + 3 gate-sized (down ~ gate)
    part = {}
    for name in ("q_proj", "k_proj", "gate_proj"):
        part[name], model = time_peft(cpu_w[:1], r, "pissa", (name,))
        if name in ("q_proj", "k_proj"):
            e = errors(model, gpu_w[0][name], refs[f"layers.0.{name}"], f"layers.0.{name}", True)
            err[f"peft pissa (exact) (cpu) {name}"] = e
        del model
    per_layer = 2 * part["q_proj"] + 2 * part["k_proj"] + 3 * part["gate_proj"]
    rows.append(("peft pissa (exact)", "cpu", per_layer * n,
                 "q,k,gate of 1 layer measured ({}), layer = 2q+2k+3gate, x{}".format(
                     ", ".join(f"{a} {b:.1f} s" for a, b in part.items()), n)))
    print(rows[-1], flush=True)
    write(args.out, rows, err, n, r, dims)


def write(out: str, rows, err, n: int, r: int, dims, echo: bool = True) -> None:
    import peft
    import transformers

    by = {(lab, pl): sec for lab, pl, sec, _ in rows}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    lines = [
        "# PiSSA init speed: ours vs peft", "",
        f"Device: {device}; torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}.",
        f"Model: {n} layers x (q, k, v, o, gate, up, down), hidden/kv/intermediate = {dims}, random bf16 weights "
        f"(std 0.02), rank r = {r}, alpha = r. Times include module creation, fp32 casts, transfers and writing the "
        "bf16 residual back to where the weight lives.", "",
        "| method | weights start on | seconds (32 layers) | how |", "|---|---|---|---|",
    ]
    lines += [f"| {lab} | {pl} | {sec:.2f} | {how} |" for lab, pl, sec, how in rows]
    lines += ["", "| mode | placement | peft / ours (speed-up) | target |", "|---|---|---|---|"]
    for mode, peer, ours, target in (("niter=4", "peft pissa_niter_4", "ours niter=4", 3),
                                     ("exact", "peft pissa (exact)", "ours exact", 5)):
        for pl in ("gpu", "cpu"):
            if (peer, pl) in by and (ours, pl) in by:
                ratio = by[peer, pl] / by[ours, pl]
                lines.append(f"| {mode} | {pl} | {ratio:.2f}x | >= {target}x: {'met' if ratio >= target else 'MISSED'} |")
    lines += ["", "Errors on layer 0 (float64 reference: exact rank-r truncation W_r from torch.linalg.svd):", "",
              "| method | matrix | rel. err of W_res + sBA vs W | rel. err of sBA vs W_r |", "|---|---|---|---|"]
    lines += [f"| {k.rsplit(' ', 1)[0]} | {k.rsplit(' ', 1)[1]} | {a:.2e} | {b:.2e} |" for k, (a, b) in err.items()]
    lines += ["", "Note: W_res is stored in bf16, so W_res + sBA differs from W by bf16 rounding of the residual "
              "(~1e-3 relative) for every method. Random Gaussian weights have a flat spectrum, so 4 power iterations "
              "stay far from W_r for peft and ours alike (same algorithm: Halko with q = r)."]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
