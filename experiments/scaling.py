"""Scaling: tokens/s and peak memory per GPU on 1 vs N GPUs (FSDP2 via memfit.parallel.fsdp.shard_model) for our
dense+LoRA, PiSSA+CCE, QPiSSA+CCE and NeuZip+PiSSA+CCE, side by side with plain peft LoRA + HF cross-entropy on the
same ~1B Llama-shaped model (random weights, vocab 128256), same inputs, in the same run (same processes).

    python experiments/scaling.py                 # 1 and 2 GPUs (device kind nvidia-h200-x2); writes results/scaling.md
    python experiments/scaling.py --worlds 1,2,4  # and 4 GPUs (scaling efficiency = x 1-GPU tokens/s / GPUs)
    python experiments/scaling.py --smoke         # tiny shapes on CPU over gloo: checks the script, not a result

A variant that raises (at any world size) is listed with its error and the others still run (`run_isolated`); the
table is rewritten after every world size, so a stage timeout keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from fsdp_equality import LLAMA_1B, checkpoint, run_isolated, setup_dist
from headline import RESULTS, SMOKE, Variant, device_name, ours, peer, versions

STACKS = {"lora": ("lora", "dense", "torch"), "pissa_cce": ("pissa", "dense", "cce"),
          "qpissa_cce": ("pissa", "nf4", "cce"), "neuzip_pissa_cce": ("pissa", "neuzip", "cce")}


def variant(name: str, rank: int) -> Variant:
    return peer(quantized=False, rank=rank) if name == "peer" else ours(*STACKS[name], rank)


def worker(local_rank: int, world: int, port: int, names: list[str], work: Path, args: argparse.Namespace,
           ckpt: str) -> None:
    """One world: every variant in `names` in turn; rank 0 writes `work/started` before and a row file after each
    (so `run_isolated` can name a variant that fails and carry on with the rest)."""
    from torch.distributed.device_mesh import init_device_mesh

    from memfit.parallel.fsdp import shard_model

    device = setup_dist(local_rank, world, port, args.smoke, 120)  # a hung collective fails in 2 min, not 10
    cuda = device.type == "cuda"
    mesh = init_device_mesh(device.type, (world,))
    arch = SMOKE if args.smoke else LLAMA_1B
    seq = 128 if args.smoke else args.seq_len
    for name in names:
        if local_rank == 0:
            (work / "started").write_text(name)
        v = variant(name, args.rank)
        torch.manual_seed(0)  # the same adapter init on every rank
        model, step_loss = v.build(Path(ckpt), device)
        root = shard_model(model, mesh, param_dtype="bfloat16", reduce_dtype="float32")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        gen = torch.Generator().manual_seed(1000 + local_rank)  # each rank its own micro-batch, same across variants
        batches = [torch.randint(0, arch["vocab_size"], (1, seq), generator=gen).to(device) for _ in range(args.steps)]
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = 0.0
        for i, ids in enumerate(batches):
            if i == args.warmup:
                if cuda:
                    torch.cuda.synchronize(device)
                dist.barrier()
                t0 = time.perf_counter()
            loss = root(step_loss, model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
        stats = torch.tensor([peak, dt], dtype=torch.float64, device=device)
        gathered = [torch.zeros_like(stats) for _ in range(world)]
        dist.all_gather(gathered, stats)
        peaks = [float(g[0]) for g in gathered]
        tps = world * seq * (args.steps - args.warmup) / max(float(g[1]) for g in gathered)
        row = {"variant": v.name, "key": name, "gpus": world, "tokens_per_s": tps, "peak_gib_max": max(peaks),
               "peak_gib_per_rank": peaks, "loss": loss.item()}
        if local_rank == 0:
            (work / f"row_{name}.json").write_text(json.dumps(row))
            print(f"[world {world}] {row}", flush=True)
        del model, root, opt, batches, loss
        if cuda:
            torch.cuda.empty_cache()
    dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace, ckpt: Path, tmp: Path, failures: dict[str, str]) -> list[dict]:
    """All variants at one world size; a variant that raises is recorded in `failures` and the others still run."""
    names = [n for n in args.variants.split(",") if n]
    order = [n for n in names if n != "neuzip_pissa_cce"] + ["peer"] + [n for n in names if n == "neuzip_pissa_cce"]
    work = tmp / f"w{world}"
    work.mkdir()
    for name, why in run_isolated(worker, world, order, work, args, str(ckpt)).items():
        failures[f"{name} @ {world} GPU(s)"] = why
    rows = {json.loads(f.read_text())["key"]: json.loads(f.read_text()) for f in work.glob("row_*.json")}
    return [rows[n] for n in [*names, "peer"] if n in rows]  # the peer last: the reference of the ratios


def table(rows: list[dict], device: str, failures: dict[str, str] | None = None) -> str:
    worlds = sorted({r["gpus"] for r in rows})
    lines = [f"# Scaling: {' vs '.join(map(str, worlds))} GPUs, FSDP2", "", f"Device: {device}; {versions()}", "",
             "Llama-shaped ~1B model (random weights, vocab 128256), micro-batch 1 per GPU; FSDP2 per block and per "
             "trainable Linear, bf16 compute, fp32 reduce; peer = peft LoRA + HF cross-entropy under the same FSDP2. "
             "x 1-GPU tokens/s / GPUs = scaling efficiency.",
             "", "| variant | GPUs | tokens/s | x peer | per-GPU peak GiB | x peer | x 1-GPU tokens/s | efficiency | last loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    nan = {"tokens_per_s": float("nan"), "peak_gib_max": float("nan")}
    peer_of = {r["gpus"]: r for r in rows if r["variant"].startswith("peer")}
    one = {r["variant"]: r for r in rows if r["gpus"] == 1}
    for r in sorted(rows, key=lambda r: (r["gpus"], r["variant"].startswith("peer"))):
        p, o = peer_of.get(r["gpus"], nan), one.get(r["variant"], nan)
        speedup = r["tokens_per_s"] / o["tokens_per_s"]
        lines.append(f"| {r['variant']} | {r['gpus']} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s'] / p['tokens_per_s']:.2f} | {r['peak_gib_max']:.2f} | "
                     f"{r['peak_gib_max'] / p['peak_gib_max']:.2f} | {speedup:.2f} | {speedup / r['gpus']:.0%} | "
                     f"{r['loss']:.3f} |")
    if failures:
        lines += ["", "Failed (the error each raised):", "", *[f"- {k}: {v}" for k, v in failures.items()]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--variants", default=",".join(STACKS), help="ours to run (the peer always runs)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--ckpt", default=None, help="checkpoint folder, made if absent (default: a temp folder)")
    ap.add_argument("--out", default=str(RESULTS / "scaling.md"))
    args = ap.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    if not args.smoke and torch.cuda.device_count() < max(worlds):
        raise SystemExit(f"scaling needs {max(worlds)} GPUs (found {torch.cuda.device_count()}); --smoke for CPU")
    unknown = [n for n in args.variants.split(",") if n and n not in STACKS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(STACKS)}")
    dev = "CPU (gloo, smoke shapes: not a result)" if args.smoke else device_name(torch.device("cuda", 0))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    failures: dict[str, str] = {}
    text = ""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint(SMOKE if args.smoke else LLAMA_1B, Path(args.ckpt or Path(tmp) / "llama"))
        for w in worlds:
            rows += run_world(w, args, ckpt, Path(tmp), failures)
            text = table(rows, dev, failures)
            out.write_text(text)  # after every world: a later timeout keeps what is done
    print(text)
    return text


if __name__ == "__main__":
    main()
