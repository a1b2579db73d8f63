"""Scaling through the app: tokens/s and peak memory per GPU on 1 vs N GPUs with FSDP2 (`trainer=fsdp
trainer.devices=N`), each world size a `python -m memfit.train experiment=headline ...` process, on one ~1B
Llama-shaped checkpoint (random bf16 weights, vocab 128256); and FSDP2's equality: world 1 at micro-batch N and world
N at micro-batch 1 train on the same global batches (the loaders shard by rank), so their per-step losses (the app's
LossLog, averaged over ranks) must agree to bf16 rounding.

    python experiments/scaling.py                 # worlds 1 and 2 (device kind with 2 GPUs); writes results/scaling.md
    python experiments/scaling.py --worlds 1,2,4
    python experiments/scaling.py --smoke         # tiny shapes on CPU over gloo: checks the script, not a result

Figures come from each run's results.json (the app's monitor); the peer (peft) has no FSDP loop here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_bench import LLAMA32_1B, SMOKE, device_name, make_checkpoint, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STACKS = {"lora": ["adapter=lora", "storage=dense", "loss=torch"], "pissa_cce": ["adapter=pissa", "storage=dense"],
          "qpissa_cce": ["adapter=pissa", "storage=nf4"], "neuzip_pissa_cce": ["adapter=pissa", "storage=neuzip"]}


def app(world: int, stack: str, ckpt: Path, seq: int, vocab: int, steps: int, work: Path, smoke: bool) -> dict:
    """One world size of one stack through `python -m memfit.train`: results.json + per-step losses."""
    run_dir = work / f"{stack}-w{world}"
    cmd = [sys.executable, "-m", "memfit.train", "experiment=headline", f"model.path={ckpt}", "trainer=fsdp",
           f"trainer.devices={world}", f"data.max_length={seq}", f"data.vocab_size={vocab}",
           f"data.batch_size={max(1, 2 // world)}", f"trainer.max_steps={steps}", *STACKS[stack],
           "+callbacks.losslog._target_=memfit.callbacks.monitor.LossLog", f"+callbacks.losslog.path={run_dir}/loss.jsonl",
           f"hydra.run.dir={run_dir}", f"paths.output_dir={run_dir}", f"paths.cache_dir={work}/cache",
           "trainer.enable_progress_bar=false", "print_summary=false",
           *(["trainer.accelerator=cpu", "model.dtype=float32", "trainer.strategy.param_dtype=none"] if smoke else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
    res = json.loads((run_dir / "results.json").read_text())
    losses = [json.loads(line)["loss"] for line in (run_dir / "loss.jsonl").read_text().splitlines()]
    return {**res["perf"], "losses": losses}


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--stacks", default=",".join(STACKS))
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "scaling.md"))
    a = ap.parse_args(argv)
    worlds = [int(w) for w in a.worlds.split(",")]
    if not a.smoke and torch.cuda.device_count() < max(worlds):
        raise SystemExit(f"needs {max(worlds)} GPUs, found {torch.cuda.device_count()} (use --smoke on CPU)")
    arch = SMOKE if a.smoke else LLAMA32_1B
    seq = 64 if a.smoke else a.seq_len
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(arch, Path(tmp) / "llama")
        for stack in a.stacks.split(","):
            per = {w: app(w, stack, ckpt, seq, arch["vocab_size"], a.steps, Path(tmp), a.smoke) for w in worlds}
            rows.append((stack, per))
            print(stack, {w: {k: v for k, v in r.items() if k != "losses"} for w, r in per.items()}, flush=True)
    lines = ["# Scaling through the app: FSDP2 on 1 vs N GPUs", "", f"Device: {device_name()}; {versions()}", "",
             ("smoke-test shapes on CPU (not a result)" if a.smoke else "Llama-3.2-1B shape, random bf16 weights") +
             f"; seq {seq}, global batch 2 (micro-batch 2 on 1 device, 1 per device on 2), {a.steps} steps, "
             "activation checkpointing, rank 16; each cell one `python -m memfit.train experiment=headline "
             "trainer=fsdp trainer.devices=N ...`. Efficiency = tokens/s(N) / (N x tokens/s(1)); loss gap = the "
             "largest |loss(N) - loss(1)| over the steps, relative to loss(1).", "",
             "| stack | world | tokens/s | efficiency | peak GiB (max rank) | loss gap |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for stack, per in rows:
        one = per.get(worlds[0], {})
        for w, r in per.items():
            if "error" in r:
                lines.append(f"| {stack} | {w} | failed: {r['error']} | | | |")
                continue
            eff = r["tokens_per_s"] / (w * one["tokens_per_s"]) if one.get("tokens_per_s") else float("nan")
            gap = max((abs(x - y) / abs(y) for x, y in zip(r["losses"], one.get("losses", []))), default=float("nan"))
            lines.append(f"| {stack} | {w} | {r['tokens_per_s']:.0f} | {eff:.2f} | {r['peak_mem_gib']:.2f} | {gap:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
