"""Scaling: tokens/s and peak memory per GPU on 1 vs 2 GPUs (FSDP2 via framework.parallel.fsdp.shard_model) for our
dense+LoRA, PiSSA+CCE, QPiSSA+CCE and NeuZip+PiSSA+CCE, side by side with plain peft LoRA + HF cross-entropy on the
same ~1B Llama-shaped model (random weights, vocab 128256), same inputs, in the same run (same processes).

    python experiments/scaling.py                 # 1 and 2 GPUs (device kind nvidia-h200-x2); writes results/scaling.md
    python experiments/scaling.py --smoke         # tiny shapes on CPU over gloo: checks the script, not a result
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from headline import RESULTS, SMOKE, device_name, make_checkpoint, ours, peer, versions

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                tie_word_embeddings=False)


STACKS = {"lora": ("lora", "dense", "torch"), "pissa_cce": ("pissa", "dense", "cce"),
          "qpissa_cce": ("pissa", "nf4", "cce"), "neuzip_pissa_cce": ("pissa", "neuzip", "cce")}


def variants(rank: int, names: list[str]) -> list:
    unknown = [n for n in names if n not in STACKS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(STACKS)}")
    return [ours(*STACKS[n], rank) for n in names] + [peer(quantized=False, rank=rank)]  # the peer last: reference


def worker(local_rank: int, world: int, port: int, args: argparse.Namespace, ckpt: str, out_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from framework.parallel.fsdp import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=local_rank, world_size=world)
    mesh = init_device_mesh(device.type, (world,))
    arch = SMOKE if args.smoke else LLAMA_1B
    seq = 128 if args.smoke else args.seq_len
    rows = []
    for v in variants(args.rank, args.variants.split(",")):
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
        rows.append({"variant": v.name, "gpus": world, "tokens_per_s": tps, "peak_gib_max": max(peaks),
                     "peak_gib_per_rank": peaks, "loss": float(loss)})
        del model, root, opt, batches
        if cuda:
            torch.cuda.empty_cache()
    if local_rank == 0:
        torch.save(rows, out_file)
    dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace, ckpt: Path, tmp: Path) -> list[dict]:
    out = tmp / f"rows{world}.pt"
    port = 29500 + world + os.getpid() % 1000
    mp.spawn(worker, args=(world, port, args, str(ckpt), str(out)), nprocs=world, join=True)
    return torch.load(out)


def table(rows: list[dict], device: str) -> str:
    lines = ["# Scaling: 1 vs 2 GPUs, FSDP2", "", f"Device: {device}; {versions()}", "",
             "Llama-shaped ~1B model (random weights, vocab 128256), micro-batch 1 per GPU; FSDP2 per block and per "
             "trainable Linear, bf16 compute, fp32 reduce; peer = peft LoRA + HF cross-entropy under the same FSDP2.",
             "", "| variant | GPUs | tokens/s | x peer | per-GPU peak GiB | x peer | x 1-GPU tokens/s | last loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    peer_of = {r["gpus"]: r for r in rows if r["variant"].startswith("peer")}
    one = {r["variant"]: r for r in rows if r["gpus"] == 1}
    for r in rows:
        p, o = peer_of[r["gpus"]], one.get(r["variant"], r)
        lines.append(f"| {r['variant']} | {r['gpus']} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s'] / p['tokens_per_s']:.2f} | {r['peak_gib_max']:.2f} | "
                     f"{r['peak_gib_max'] / p['peak_gib_max']:.2f} | {r['tokens_per_s'] / o['tokens_per_s']:.2f} | "
                     f"{r['loss']:.3f} |")
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
    ap.add_argument("--out", default=str(RESULTS / "scaling.md"))
    args = ap.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    if not args.smoke and torch.cuda.device_count() < max(worlds):
        raise SystemExit(f"scaling needs {max(worlds)} GPUs (found {torch.cuda.device_count()}); --smoke for CPU")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(SMOKE if args.smoke else LLAMA_1B, Path(tmp) / "llama")
        rows = [r for w in worlds for r in run_world(w, args, ckpt, Path(tmp))]
    dev = "CPU (gloo, smoke shapes: not a result)" if args.smoke else device_name(torch.device("cuda", 0))
    text = table(rows, dev)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


if __name__ == "__main__":
    main()
