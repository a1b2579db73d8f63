"""NeuZip memory through the app: peak training memory and throughput of one Llama-shaped model (random bf16 weights)
with a PiSSA adapter and the CCE loss, its frozen base stored dense / NF4 / NeuZip lossless / NeuZip 3-bit: each row is
`memfit.train.run` of `experiment=headline` with `storage=...`, figures from the app's monitor.

    python experiments/neuzip_memory.py                  # Llama-3.2-1B shape, seq 4096 (GPU)
    python experiments/neuzip_memory.py --smoke          # tiny shapes on any device (checks the script, not a result)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_bench import LLAMA32_1B, SMOKE, app_run, device_name, free, make_checkpoint, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STORAGES = [("dense", []), ("nf4", []), ("neuzip", []), ("neuzip_lossy", ["storage.mantissa_bits=3"])]


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "neuzip_memory.md"))
    a = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    arch = SMOKE if a.smoke else LLAMA32_1B
    seq = 64 if a.smoke else a.seq_len
    rows: list[tuple[str, dict]] = []
    common = [f"data.max_length={seq}", f"data.vocab_size={arch['vocab_size']}", f"trainer.max_steps={a.steps}",
              f"adapter.rank={a.rank}", f"adapter.alpha={a.rank}",
              *(["trainer=cpu", "model.dtype=float32", "trainer.precision=32-true"] if not gpu else [])]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(arch, Path(tmp) / "llama")
        for storage, extra in STORAGES:
            try:
                r, res = app_run("headline", [f"model.path={ckpt}", f"storage={storage}", *extra, *common],
                                 Path(tmp) / storage)
                r["model_gib"] = res["perf"].get("model_mem_gib")
                del res
            except Exception as e:  # one failing storage must not hide the others
                r = {"error": f"{type(e).__name__}: {e}"[:200]}
            free()
            rows.append((storage + (" " + " ".join(extra) if extra else ""), r))
            print(rows[-1], flush=True)
    dense = rows[0][1]
    lines = ["# NeuZip memory through the app: frozen-base storage under PiSSA + CCE", "",
             f"Device: {device_name()}; {versions()}", "",
             ("smoke-test shapes (not a result)" if a.smoke else "Llama-3.2-1B shape (16 x 2048, MLP 8192, vocab "
              "128256, untied head; random bf16 weights, std 0.02)") +
             f"; seq {seq}, micro-batch 1, activation checkpointing, PiSSA rank {a.rank} (niter 4) on q,k,v,o,gate,"
             "up,down, fp32 adapter factors, AdamW; embeddings and lm_head stay dense bf16. Each row: `python -m "
             f"memfit.train experiment=headline model.path=CKPT storage=... data.max_length={seq}`; 'model GiB' = "
             "allocated at the start of training (weights + adapters), 'peak GiB' = max allocated during the "
             f"{a.steps} steps, tokens/s after the first 2 (the app's monitor).", "",
             "| storage | model GiB | x dense | peak GiB | x dense | tokens/s | x dense | first / last loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | |")
            continue
        model = f"{r['model_gib']:.2f}" if r.get("model_gib") is not None else "-"
        lines.append(f"| {name} | {model} | {ratio(r.get('model_gib'), dense.get('model_gib'))} | "
                     f"{r['peak_gib']:.2f} | {ratio(r['peak_gib'], dense.get('peak_gib'))} | {r['tokens_per_s']:.0f} | "
                     f"{ratio(r['tokens_per_s'], dense.get('tokens_per_s'))} | "
                     f"{r['first_loss']:.3f} / {r['last_loss']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
