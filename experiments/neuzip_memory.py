"""NeuZip memory: peak training memory and step time of one Llama-shaped model (random bf16 weights, built from a
config) with a PiSSA adapter and the CCE loss, its frozen base stored dense / NF4 / NeuZip lossless / NeuZip 3-bit, in
one process on the same token ids. Same builders and measurement as `experiments/headline.py`.

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
from headline import SMOKE, device_name, free, make_checkpoint, measure, ours, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                  tie_word_embeddings=False)
STORAGES = [("dense", ()), ("nf4", ()), ("neuzip", ()), ("neuzip_lossy", ("storage.mantissa_bits=3",))]


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "neuzip_memory.md"))
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = SMOKE if a.smoke else LLAMA32_1B
    seq = 64 if a.smoke else a.seq_len
    rows: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(arch, Path(tmp) / "llama")
        for storage, extra in STORAGES:
            v = ours("pissa", storage, "cce", a.rank, extra)
            try:
                built = v.build(ckpt, device)
                r = measure(built, device, seq, a.steps, a.warmup, arch["vocab_size"])
                del built
            except Exception as e:  # one failing storage must not hide the others
                r = {"error": f"{type(e).__name__}: {e}"[:200]}
            free(device)
            rows.append((v.name, r))
            print(v.name, r, flush=True)
    dense = rows[0][1]
    lines = ["# NeuZip memory: frozen-base storage under PiSSA + CCE", "",
             f"Device: {device_name(device)}; {versions()}", "",
             ("smoke-test shapes (not a result)" if a.smoke else "Llama-3.2-1B shape (16 x 2048, MLP 8192, vocab "
              "128256, untied head; random bf16 weights, std 0.02)") +
             f"; seq {seq}, micro-batch 1, activation checkpointing, PiSSA rank {a.rank} (niter 4) on q,k,v,o,gate,"
             f"up,down, fp32 adapter factors, AdamW; embeddings and lm_head stay dense bf16. 'model GiB' = memory "
             f"allocated after set-up (weights + adapters), 'peak GiB' = max allocated during {a.steps} training "
             f"steps; s/step over the last {a.steps - a.warmup}.", "",
             "| storage | model GiB | x dense | peak GiB | x dense | s/step | x dense | tokens/s | first loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | | |")
            continue
        step = seq / r["tokens_per_s"]
        dstep = seq / dense["tokens_per_s"] if "tokens_per_s" in dense else float("nan")
        lines.append(f"| {name} | {r['weights_gib']:.2f} | {ratio(r['weights_gib'], dense.get('weights_gib', 0)):.2f} | "
                     f"{r['peak_gib']:.2f} | {ratio(r['peak_gib'], dense.get('peak_gib', 0)):.2f} | {step:.3f} | "
                     f"{ratio(step, dstep):.2f} | {r['tokens_per_s']:.0f} | {r['first_loss']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
