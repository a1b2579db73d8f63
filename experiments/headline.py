"""Headline: fine-tuning a Llama-3-8B-shaped model (random bf16 weights, vocab 128256) at sequence length 8192,
micro-batch 1, activation checkpointing on, rank 16, on one GPU. Ours runs through the app itself
(`memfit.train.run` with `experiment=headline`: QPiSSA + CCE; throughput and peak memory from the app's monitor);
the peer, peft QLoRA (bitsandbytes NF4) + HF cross-entropy, keeps its own loop below. Both train on the very same
batches (the app's `data=random` module) in one process, plus the longest sequence each fits.

    python experiments/headline.py                # full run (H100/H200), writes experiments/results/headline.md
    python experiments/headline.py --smoke        # tiny shapes on any device (checks the script, not a result)

Target (issue 16): ours <= 0.6x the peer's peak memory at >= 1.0x its tokens/s at seq 8192.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_bench import LLAMA3_8B, SMOKE, app_run, device_name, free, longest, make_checkpoint, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peer_model(ckpt: Path, rank: int, quantized: bool) -> torch.nn.Module:
    """peft LoRA (QLoRA on bitsandbytes NF4 when `quantized`) with gradient checkpointing, as its docs set it up."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw: dict[str, Any] = {"dtype": torch.bfloat16}
    if quantized:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
        kw["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(ckpt, **kw)
    gc_kw = {"use_reentrant": False}
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=gc_kw)
    else:
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kw)
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, lora_dropout=0.0))
    return model.train()


def peer_batches(res: dict[str, Any], seq: int, steps: int) -> list[torch.Tensor]:
    """The batches the app trained on, in its order (the app's data module, same config and seed)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    dm = instantiate(OmegaConf.merge(res["config"].data, {"max_length": seq}))
    dm.set_tokenizer(res["module"].tokenizer)
    loader = dm.train_dataloader()
    loader.epoch_sampler.set_epoch(0)
    return [b["input_ids"] for _, b in zip(range(steps), loader)]


def peer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def peer_measure(model: torch.nn.Module, batches: list[torch.Tensor], warmup: int) -> dict[str, Any]:
    """Peak memory over the training steps and tokens/s after `warmup` steps (the app monitor's conventions)."""
    dev = next(p for p in model.parameters() if p.requires_grad).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    free()
    losses, t0 = [], 0.0
    for i, ids in enumerate(batches):
        if i == warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        losses.append(peer_step(model, opt, ids.to(dev)))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    tokens = sum(b.numel() for b in batches[warmup:])
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    del opt
    return {"peak_gib": peak, "tokens_per_s": tokens / (time.perf_counter() - t0), "first_loss": losses[0],
            "last_loss": losses[-1], "losses": losses}


def peer_longest(model: torch.nn.Module, start: int, vocab: int, step: int = 8192, limit: int = 1 << 20) -> str:
    def ok(seq: int) -> bool:
        try:
            peer_measure(model, [torch.randint(3, vocab, (1, seq))], warmup=0)
            return True
        except torch.OutOfMemoryError:
            for p in model.parameters():
                p.grad = None
            free()
            return False

    lo, hi = 0, start
    while hi <= limit and ok(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return f">= {lo} (limit)"
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return str(lo)


def table(ours: dict, peer: dict, notes: str) -> str:
    def ratio(k: str) -> str:
        return f"{ours[k] / peer[k]:.2f}" if peer.get(k) else "-"

    mfu = f"{100 * ours['mfu']:.1f}%" if ours.get("mfu") else "-"
    lines = ["# Headline: QPiSSA + CCE through the app vs peft QLoRA + HF cross-entropy", "",
             f"Device: {device_name()}; {versions()}", "", notes, "",
             "| variant | peak GiB | x peer | tokens/s | x peer | MFU | longest seq | first / last loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| ours (app: experiment=headline) | {ours['peak_gib']:.2f} | {ratio('peak_gib')} | "
             f"{ours['tokens_per_s']:.0f} | {ratio('tokens_per_s')} | {mfu} | {ours.get('longest', '-')} | "
             f"{ours['first_loss']:.3f} / {ours['last_loss']:.3f} |"]
    if peer:
        lines.append(f"| peer: peft QLoRA (bnb NF4) + HF CE | {peer['peak_gib']:.2f} | 1.00 | "
                     f"{peer['tokens_per_s']:.0f} | 1.00 | - | {peer.get('longest', '-')} | "
                     f"{peer['first_loss']:.3f} / {peer['last_loss']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-longest", action="store_true")
    ap.add_argument("--longest-budget", type=float, default=300.0, help="seconds for our longest-sequence search")
    ap.add_argument("--longest-start", type=int, default=131072)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-peer-longest", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU-capable, unquantized peer")
    ap.add_argument("--out", default=str(RESULTS / "headline.md"))
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not args.smoke and not gpu:
        raise SystemExit("headline needs a CUDA GPU (bitsandbytes QLoRA peer); use --smoke to check the script")
    arch = SMOKE if args.smoke else LLAMA3_8B
    seq = 128 if args.smoke else args.seq_len
    shape = "smoke-test shapes (not a result)" if args.smoke else "Llama-3-8B shape (random bf16 weights, vocab 128256)"
    notes = (f"{shape}; seq {seq}, micro-batch 1, activation checkpointing on for both, rank {args.rank} on all 7 "
             f"projections, AdamW, grad clip 1.0; {args.steps} steps on the same batches, tokens/s over the steps after "
             "the first 2, peak = max allocated during training. Ours: `python -m memfit.train experiment=headline "
             f"model.path=CKPT data.max_length={seq} data.vocab_size={arch['vocab_size']}`. Longest seq: one training "
             "step without running out of memory (multiples of 8192). Target: peak <= 0.6x peer at >= 1.0x its "
             "tokens/s.")
    out = Path(args.out)
    overrides = [f"data.max_length={seq}", f"data.vocab_size={arch['vocab_size']}", f"trainer.max_steps={args.steps}",
                 f"adapter.rank={args.rank}", f"adapter.alpha={args.rank}",
                 *(["trainer=cpu", "model.dtype=float32", "trainer.precision=32-true"] if not gpu else [])]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(arch, Path(tmp) / "llama")
        ours, res = app_run("headline", [f"model.path={ckpt}", *overrides], Path(tmp))
        print("ours", {k: v for k, v in ours.items() if k != "losses"}, flush=True)
        out.write_text(table(ours, {}, notes))
        batches = peer_batches(res, seq, args.steps)
        if gpu and not args.no_longest:
            ours["longest"] = longest(res, max(seq, args.longest_start), budget_s=args.longest_budget)
            print("ours longest", ours["longest"], flush=True)
        res["module"].cpu()
        del res
        free()
        peer: dict[str, Any] = {}
        if not args.no_peer:
            model = peer_model(ckpt, args.rank, quantized=gpu and not args.smoke)
            peer = peer_measure(model, batches, warmup=2)
            print("peer", {k: v for k, v in peer.items() if k != "losses"}, flush=True)
            out.write_text(table(ours, peer, notes))
            if gpu and not args.no_longest and not args.no_peer_longest:
                peer["longest"] = peer_longest(model, 32768, arch["vocab_size"])
    text = table(ours, peer, notes)
    out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
