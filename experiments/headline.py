"""Headline: fine-tuning a Llama-3-8B-shaped model (random weights, vocab 128256) at sequence length 8192,
micro-batch 1, activation checkpointing, on one GPU: peak memory and tokens/s of QPiSSA + CCE (ours) versus the baseline
users run today, peft QLoRA (bitsandbytes NF4) + HF cross-entropy, in the same process on the same inputs; plus the
longest sequence each variant fits in memory.

    python experiments/headline.py                       # full run (H100/H200), writes experiments/results/headline.md
    python experiments/headline.py --smoke               # tiny shapes on any device (checks the script, not a result)

Target (issue 9): ours <= 0.6x the baseline's peak memory at >= its tokens/s. No Hydra app needed: the variants'
adapter/storage/loss settings are composed from conf/ with `memfit.config.compose`.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                 tie_word_embeddings=False)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Variant:
    name: str
    build: Callable[[Path, torch.device], tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor]]]


def versions() -> str:
    names = ["torch", "transformers", "peft", "bitsandbytes", "lightning", "pytorch-lightning", "triton"]
    found = []
    for n in names:
        try:
            found.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(found)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"


def make_checkpoint(arch: dict, out: Path) -> Path:
    """Random-weight Llama checkpoint (bf16) on disk, so every variant loads the same weights its own way.
    The weights are drawn on the GPU when there is one (an 8B model's 16 GB take minutes on the CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    where = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**arch, torch_dtype="bfloat16"))
    model = model.to_empty(device=where).to(torch.bfloat16)
    for p in model.parameters():  # scaled-normal init; norms at 1
        with torch.no_grad():
            p.copy_(torch.ones_like(p) if p.dim() == 1 else torch.randn_like(p) * 0.02)
    model.save_pretrained(out)
    del model
    if where == "cuda":
        torch.cuda.empty_cache()
    return out


def enable_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def ours(adapter: str, storage: str, loss: str, rank: int, extra: tuple[str, ...] = ()) -> Variant:
    """Our stack from the config tree: adapter/storage/loss groups (+ `extra` overrides, e.g.
    `storage.mantissa_bits=3`), exactly what `memfit.train` would build."""

    def build(ckpt: Path, device: torch.device):
        from transformers import AutoModelForCausalLM

        from memfit.adapters import apply_adapter
        from memfit.config import build as build_cfg
        from memfit.config import compose
        from memfit.quant import apply_storage

        cfg = compose("train", [f"adapter={adapter}", f"storage={storage}", f"loss={loss}", "paths.output_dir=/tmp/x",
                                *([f"adapter.rank={rank}"] if adapter != "none" else []),
                                *(["adapter.niter=4"] if adapter == "pissa" else []), *extra])  # randomized SVD init
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).to(device)
        model = apply_storage(apply_adapter(model, cfg.adapter, storage=cfg.storage), cfg.storage)
        for p in model.parameters():  # trainable adapter factors in fp32 (AdamW master weights)
            if p.requires_grad:
                p.data = p.data.float()
        enable_checkpointing(model)
        model.train()  # HF checkpoints layers only in training mode (from_pretrained returns eval mode)
        loss_fn = build_cfg(cfg.loss)

        def step_loss(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                hidden = m.model(input_ids=ids, use_cache=False).last_hidden_state
            return loss_fn(hidden, m.lm_head.weight, ids, shift=1)

        return model, step_loss

    return Variant(f"ours: {adapter}+{storage}+{loss}" + "".join(f" {e}" for e in extra), build)


def peer(quantized: bool, rank: int) -> Variant:
    """peft LoRA (QLoRA with bitsandbytes NF4 when `quantized`) + HF's own cross-entropy (`labels=`)."""

    def build(ckpt: Path, device: torch.device):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        kw: dict = {"dtype": torch.bfloat16}
        if quantized:
            kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
            kw["device_map"] = {"": device.index or 0}
        model = AutoModelForCausalLM.from_pretrained(ckpt, **kw)
        if quantized:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model = model.to(device)
            enable_checkpointing(model)
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, lora_dropout=0.0))
        model.train()

        def step_loss(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return m(input_ids=ids, labels=ids, use_cache=False).loss

        return model, step_loss

    return Variant("peer: peft " + ("QLoRA (bnb NF4)" if quantized else "LoRA") + " + HF CE", build)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


Built = tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor]]


def measure(built: Built, device: torch.device, seq: int, steps: int, warmup: int,
            vocab: int) -> dict[str, float]:
    """Peak memory of the training steps (set-up excluded) and tokens/s after warm-up; same token ids for all.
    The model is built once per variant and reused (a fresh optimizer each call), so the search stays cheap."""
    model, step_loss = built
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    gen = torch.Generator().manual_seed(1234)
    batches = [torch.randint(0, vocab, (1, seq), generator=gen).to(device) for _ in range(steps)]
    free(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    losses, t0 = [], 0.0
    for i, ids in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        loss = step_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    out = {"peak_gib": peak, "weights_gib": base / 2**30, "tokens_per_s": seq * (steps - warmup) / dt,
           "first_loss": losses[0]}
    del model, opt, batches
    free(device)
    return out


def fits(built: Built, device: torch.device, seq: int, vocab: int) -> bool:
    try:
        measure(built, device, seq, steps=1, warmup=0, vocab=vocab)
        return True
    except torch.OutOfMemoryError:
        for p in built[0].parameters():
            p.grad = None
        free(device)
        return False


def longest(built: Built, device: torch.device, start: int, vocab: int, step: int = 4096,
            limit: int = 131072, budget_s: float = float("inf")) -> str:
    """Longest sequence (a multiple of `step`, up to `limit`) that trains one step without running out of memory.
    Doubling, then bisection; when `budget_s` runs out the answer so far is returned as a bound ('>= N')."""
    t_end = time.perf_counter() + budget_s
    lo, hi = 0, start
    while hi <= limit and fits(built, device, hi, vocab):
        lo, hi = hi, hi * 2
        if time.perf_counter() > t_end:
            return f">= {lo}"
    if hi > limit:
        return f">= {lo} (limit)"
    while hi - lo > step:
        if time.perf_counter() > t_end:
            return f"{lo}-{hi - step}"
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(built, device, mid, vocab) else (lo, mid)
    return str(lo)


def table(rows: list[tuple[str, dict]], device: torch.device, title: str, notes: str) -> str:
    base = rows[-1][1]  # the peer is measured last and is the reference of the ratios
    lines = [f"# {title}", "", f"Device: {device_name(device)}; {versions()}", "", notes, "",
             "| variant | peak GiB | x peer | tokens/s | x peer | longest seq | first loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows:
        lines.append(f"| {name} | {r['peak_gib']:.2f} | {r['peak_gib'] / base['peak_gib']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} | "
                     f"{r.get('longest', '-')} | {r['first_loss']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-longest", action="store_true", help="skip the longest-sequence search")
    ap.add_argument("--longest-budget", type=float, default=float("inf"), help="seconds per variant for the search")
    ap.add_argument("--longest-limit", type=int, default=131072)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, unquantized peer: checks the script runs")
    ap.add_argument("--out", default=str(RESULTS / "headline.md"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.smoke and device.type != "cuda":
        raise SystemExit("headline needs a CUDA GPU (bitsandbytes QLoRA peer); use --smoke to check the script")
    arch = SMOKE if args.smoke else LLAMA3_8B
    seq = 128 if args.smoke else args.seq_len
    variants = [ours("pissa", "nf4", "cce", args.rank), peer(quantized=not args.smoke, rank=args.rank)]
    shape = "smoke-test shapes (not a result)" if args.smoke else "Llama-3-8B shape (random weights, vocab 128256)"
    notes = (f"{shape}; seq {seq}, micro-batch 1, activation checkpointing, rank {args.rank}, AdamW; peak = max "
             f"allocated during {args.steps} training steps; tokens/s over the last {args.steps - args.warmup}; "
             f"longest seq: one training step without OOM, multiples of 4096 up to {args.longest_limit}. "
             "Target: peak <= 0.6x peer at >= 1.0x its tokens/s.")
    rows: list[tuple[str, dict]] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md_text = ""

    def write() -> None:  # after every variant, so a time-out keeps what was measured
        nonlocal md_text
        md_text = table(rows, device, "Headline: QPiSSA + CCE vs peft QLoRA + HF cross-entropy", notes)
        out.write_text(md_text)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(arch, Path(tmp) / "llama")
        for v in variants:
            t0 = time.perf_counter()
            built = v.build(ckpt, device)
            t_build = time.perf_counter() - t0
            r = measure(built, device, seq, args.steps, args.warmup, arch["vocab_size"])
            r["build_s"] = t_build
            rows.append((v.name, r))
            write()
            if not args.no_longest and device.type == "cuda":
                r["longest"] = longest(built, device, seq, arch["vocab_size"], limit=args.longest_limit,
                                       budget_s=args.longest_budget)
                write()
            del built
            free(device)
            print(v.name, r, flush=True)
    print(md_text)
    return md_text


if __name__ == "__main__":
    main()
