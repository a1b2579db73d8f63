"""FSDP2 equality: training on 1 vs 2 (vs 4) GPUs with `memfit.parallel.fsdp.shard_model` gives the same per-step
global-mean losses within bf16 tolerance, for a ~1B Llama-shaped model (random weights from a config) with PiSSA + CCE,
QPiSSA (storage nf4) + CCE and NeuZip (storage neuzip) + PiSSA + CCE; plus per-GPU memory (sharded state, peak).

    python experiments/fsdp_equality.py --worlds 1,2      # GPUs; writes results/fsdp_equality.md (and $OUT/ if set)
    python experiments/fsdp_equality.py --smoke           # tiny shapes on CPU over gloo: checks the script only

Why the set-up is what it is:
- The SAME global batch every world size: world 1 runs the whole batch as one micro-batch, world N gives rank r rows
  [r*B/N, (r+1)*B/N); every rank holds as many tokens, so the global mean loss is the mean of the ranks' losses and
  FSDP2's gradient average is the gradient of that mean. Only bf16 rounding (other matmul shapes) may differ.
- The batches cycle through a small pool, so the model memorises them and the loss really moves: equal curves of a
  flat loss would prove nothing. The table says how far the loss fell.
- Each world runs in its own processes; a variant that raises (e.g. a storage format whose FSDP2 hooks do not work) is
  recorded with its error as the skip reason and the other variants go on in fresh processes (`run_isolated`).
- "state" memory is what stays allocated after the last step (sharded weights, fp32 adapters, AdamW moments): it
  should roughly halve from 1 to 2 GPUs. The peak adds activations, which differ since world 1 runs B rows at once.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from headline import RESULTS, SMOKE, device_name, make_checkpoint, ours, versions  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                tie_word_embeddings=False)
STACKS = {"pissa_cce": ("pissa", "dense", "cce"), "qpissa_cce": ("pissa", "nf4", "cce"),
          "neuzip_pissa_cce": ("pissa", "neuzip", "cce")}


# ------------------------------------------------------------------------------------------------ process plumbing
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "unknown error")[:300]


def run_isolated(worker: Callable[..., None], world: int, names: list[str], work: Path, *args: Any) -> dict[str, str]:
    """Spawn `world` ranks of `worker(rank, world, port, names, work, *args)`; the worker writes `work/started` (rank 0)
    before each variant. A variant that raises on any rank (mp.spawn then ends the other ranks, so nothing hangs) is
    returned as {name: error}; the variants after it run again in fresh processes."""
    failures: dict[str, str] = {}
    remaining = list(names)
    while remaining:
        marker = work / "started"
        marker.unlink(missing_ok=True)
        try:
            mp.spawn(worker, args=(world, free_port(), remaining, work, *args), nprocs=world, join=True)
            return failures
        except Exception as e:  # noqa: BLE001 - ProcessRaisedException / ProcessExitedException: record, go on
            failed = marker.read_text().strip() if marker.exists() else remaining[0]
            failed = failed if failed in remaining else remaining[0]
            failures[failed] = last_line(str(e))
            print(f"[world {world}] {failed} FAILED: {failures[failed]}", flush=True)
            remaining = remaining[remaining.index(failed) + 1:]
    return failures


def setup_dist(rank: int, world: int, port: int, smoke: bool, timeout_s: int) -> torch.device:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:  # tiny CPU shapes: several OpenMP threads per rank on shared cores only spin (10-100x slower matmuls)
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return device


def global_batches(args: argparse.Namespace, vocab: int) -> list[torch.Tensor]:
    """The pool of global batches (B, seq), identical in every process and world size."""
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (args.batch, args.seq), generator=gen) for _ in range(args.pool)]


# ------------------------------------------------------------------------------------------------ one world
def worker(rank: int, world: int, port: int, names: list[str], work: Path, args: argparse.Namespace,
           ckpt: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from memfit.parallel.fsdp import shard_model

    device = setup_dist(rank, world, port, args.smoke, args.pg_timeout)
    try:
        mesh = init_device_mesh(device.type, (world,))
        arch = SMOKE if args.smoke else LLAMA_1B
        rows = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
        pool = [b[rows].to(device) for b in global_batches(args, arch["vocab_size"])]
        for name in names:
            if rank == 0:
                (work / "started").write_text(name)
            result = train_one(name, args, Path(ckpt), device, mesh, pool, shard_model)
            if rank == 0:
                (work / f"w{world}_{name}.json").write_text(json.dumps(result))
                print(f"[world {world}] {name}: losses {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}, "
                      f"state {result['state_gib']} GiB, peak {result['peak_gib']} GiB, "
                      f"{result['s_per_step']:.3f} s/step", flush=True)
    finally:
        dist.destroy_process_group()


def train_one(name: str, args: argparse.Namespace, ckpt: Path, device: torch.device, mesh: Any,
              pool: list[torch.Tensor], shard_model: Callable[..., Any]) -> dict[str, Any]:
    """Build the variant (same seed on every rank), shard it, train `args.steps` AdamW steps; global losses + memory."""
    world = dist.get_world_size()
    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else 0  # anything an earlier variant left behind
    torch.manual_seed(0)
    model, step_loss = ours(*STACKS[name], args.rank).build(ckpt, device)
    root = shard_model(model, mesh, param_dtype="bfloat16", reduce_dtype="float32")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    t0 = 0.0
    for i in range(args.steps):
        loss = root(step_loss, model, pool[i % len(pool)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
        if i == 0:  # time from the end of the first step: Triton compiles and lazy set-up excluded
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
    if cuda:
        torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t0) / max(1, args.steps - 1)
    total = torch.stack(losses).to(torch.float64)
    dist.all_reduce(total)  # sum of the ranks' mean losses (equal token counts) -> global mean below
    gib = 2.0**30
    mem = torch.tensor([(torch.cuda.memory_allocated(device) - before) / gib,
                        (torch.cuda.max_memory_allocated(device) - before) / gib]
                       if cuda else [float("nan")] * 2, dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(mem) for _ in range(world)]
    dist.all_gather(gathered, mem)
    del model, root, opt, losses, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"variant": name, "world": world, "losses": (total / world).tolist(), "s_per_step": dt,
            "state_gib": [round(float(g[0]), 3) for g in gathered], "peak_gib": [round(float(g[1]), 3) for g in gathered]}


# ------------------------------------------------------------------------------------------------ report
def compare(results: dict[tuple[str, int], dict], worlds: list[str], tol: float) -> tuple[list[str], bool]:
    """Rows of the equality table (each world vs the first) and whether every compared variant passed."""
    lines, ok = [], True
    base_w = int(worlds[0])
    for name in STACKS:
        base = results.get((name, base_w))
        for w in (int(x) for x in worlds[1:]):
            r = results.get((name, w))
            if base is None or r is None:
                continue
            a, b = torch.tensor(base["losses"]), torch.tensor(r["losses"])
            n = min(len(a), len(b))
            d = (a[:n] - b[:n]).abs()
            moved = float(a[0] - a[n - 1])
            rel = float((d / a[:n].abs()).max())
            passed = rel <= tol and moved > 10 * float(d.max())
            ok &= passed
            lines.append(f"| {name} | {base_w} vs {w} | {n} | {a[0]:.4f} | {a[n - 1]:.4f} | {b[n - 1]:.4f} | "
                         f"{float(d.max()):.2e} | {float(d.mean()):.2e} | {rel:.2e} | {'PASS' if passed else 'FAIL'} |")
    return lines, ok and bool(lines)


def table(results: dict[tuple[str, int], dict], failures: dict[str, str], args: argparse.Namespace, dev: str) -> str:
    worlds = args.worlds.split(",")
    arch = SMOKE if args.smoke else LLAMA_1B
    rows, ok = compare(results, worlds, args.tol)
    ok &= all(name == "neuzip_pissa_cce" for name in failures)  # NeuZip may be skipped (its FSDP2 support is WIP)
    shape = (f"hidden {arch['hidden_size']}, {arch['num_hidden_layers']} layers, vocab {arch['vocab_size']}"
             + (" (smoke shapes: NOT a result)" if args.smoke else " (Llama-3.2-1B shape with an untied head: 1.5B params, random weights)"))
    out = [f"# FSDP2 equality: {' vs '.join(worlds)} {'processes' if args.smoke else 'GPUs'}", "",
           f"Device: {dev}; {versions()}", "",
           f"{shape}; global batch {args.batch} x seq {args.seq} (the same every world size; world N: B/N rows per "
           f"rank), {args.steps} AdamW steps at lr {args.lr} over a pool of {args.pool} batches, adapter rank "
           f"{args.rank}; FSDP2 per block and per trainable Linear, bf16 params/compute, fp32 reduce, activation "
           f"checkpointing. PASS: max |loss diff| / loss <= {args.tol} and the loss fell by > 10x the max diff.", "",
           "| variant | worlds | steps | first loss | last loss (base) | last loss (other) | max abs diff | "
           "mean abs diff | max rel diff | result |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
           *rows, "", "Per-GPU memory (GiB; state = allocated after the last step, peak = max allocated over the steps; "
           "max over ranks) and time per step after the first:", "",
           "| variant | GPUs | state GiB | x base | peak GiB | x base | s/step |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in STACKS:
        base = results.get((name, int(worlds[0])))
        for w in (int(x) for x in worlds):
            r = results.get((name, w))
            if r is None:
                continue
            st, pk = max(r["state_gib"]), max(r["peak_gib"])
            bst, bpk = (max(base["state_gib"]), max(base["peak_gib"])) if base else (float("nan"),) * 2
            out.append(f"| {name} | {w} | {st:.2f} | {st / bst:.2f} | {pk:.2f} | {pk / bpk:.2f} | "
                       f"{r['s_per_step']:.3f} |")
    if failures:
        out += ["", "Skipped / failed (the error each raised; NeuZip alone may be skipped without failing the run):", ""]
        out += [f"- {name}: {why}" for name, why in failures.items()]
    out += ["", f"Overall: {'PASS' if ok else 'FAIL'}"]
    return "\n".join(out) + "\n"


def write(text: str, args: argparse.Namespace) -> None:
    paths = [Path(args.out)]
    if os.environ.get("OUT") and not args.smoke:
        paths.append(Path(os.environ["OUT"]) / "fsdp_equality.md")
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def checkpoint(arch: dict, path: Path) -> Path:
    """The random-weight checkpoint of `arch` at `path`, made once (shared by scripts run one after the other)."""
    cfg = path / "config.json"
    if cfg.exists() and all(json.loads(cfg.read_text()).get(k) == arch[k] for k in arch if k != "rope_theta"):
        return path
    tmp = path.with_name(path.name + ".partial")  # renamed when complete: a killed run leaves no half checkpoint
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    make_checkpoint(arch, tmp).rename(path)
    return path


def neuzip_reason() -> str | None:
    """Why NeuZip cannot run under fully_shard in this checkout (None: try it)."""
    try:
        from memfit.quant.neuzip import NeuZipTensor
    except Exception as e:  # noqa: BLE001
        return f"memfit.quant.neuzip does not import: {last_line(str(e))}"
    if not (hasattr(NeuZipTensor, "fsdp_pre_all_gather") and hasattr(NeuZipTensor, "fsdp_post_all_gather")):
        return "NeuZipTensor has no FSDP2 all-gather hooks (shard_model would keep it replicated)"
    return None


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--variants", default=",".join(STACKS))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4, help="global batch (rows), divisible by every world size")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--pool", type=int, default=2, help="distinct global batches, cycled")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tol", type=float, default=1e-2, help="max relative |loss diff| that passes")
    ap.add_argument("--pg-timeout", type=int, default=120, help="collective timeout (s): a hang fails, not stalls")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--ckpt", default=None, help="checkpoint folder, made if absent (default: a temp folder)")
    ap.add_argument("--out", default=None, help="default results/fsdp_equality.md (smoke: a temp file)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seq, args.steps = min(args.seq, 64), min(args.steps, 6)
    args.out = args.out or str(Path(tempfile.gettempdir()) / "fsdp_equality_smoke.md" if args.smoke
                               else RESULTS / "fsdp_equality.md")
    worlds = [int(w) for w in args.worlds.split(",")]
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in STACKS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(STACKS)}")
    bad = [w for w in worlds if args.batch % w]
    if bad:
        raise SystemExit(f"--batch {args.batch} is not divisible by world size(s) {bad}")
    if not args.smoke and torch.cuda.device_count() < max(worlds):
        raise SystemExit(f"needs {max(worlds)} GPUs (found {torch.cuda.device_count()}); --smoke for CPU")
    failures: dict[str, str] = {}
    if "neuzip_pissa_cce" in names and (why := neuzip_reason()):
        failures["neuzip_pissa_cce"] = why
        names.remove("neuzip_pissa_cce")
        print(f"skipping neuzip_pissa_cce: {why}", flush=True)
    names.sort(key=lambda n: n == "neuzip_pissa_cce")  # the one most likely to fail last: no re-spawn after it
    dev = "CPU (gloo, smoke shapes: not a result)" if args.smoke else device_name(torch.device("cuda", 0))
    results: dict[tuple[str, int], dict] = {}
    text = ""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint(SMOKE if args.smoke else LLAMA_1B, Path(args.ckpt or Path(tmp) / "llama"))
        for w in worlds:
            todo = [n for n in names if n not in failures]  # failed at an earlier world: nothing to compare with
            if not todo:
                break
            work = Path(tmp) / f"w{w}"
            work.mkdir()
            for name, why in run_isolated(worker, w, todo, work, args, str(ckpt)).items():
                failures[name] = f"{w} {'process' if w == 1 else 'processes'}: {why}"
            for f in work.glob("w*_*.json"):
                r = json.loads(f.read_text())
                results[(r["variant"], r["world"])] = r
            text = table(results, failures, args, dev)
            write(text, args)  # after every world: a later timeout keeps what is done
    print(text)
    return text


if __name__ == "__main__":
    main()
