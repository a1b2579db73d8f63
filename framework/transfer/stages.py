"""The five stage bodies. Each takes the pipeline context and the (temporary) artefact directory it fills, and returns
the metrics written next to the artefact. The algorithms live in synthesize / discriminate / distill / evaluate."""

from __future__ import annotations

import gc
import logging
import random
import re
from pathlib import Path
from typing import Any

import torch

from memfit.assemble import adapt
from memfit.config import check_choice
from memfit.data.collate import format_prompt
from memfit.models.build import build_model
from memfit.transfer import discriminate as D
from memfit.transfer.context import Context
from memfit.transfer.distill import DistillModule, same_vocabulary, teacher_rows
from memfit.transfer.evaluate import markdown_table, mmd_report, plot_embeddings, task_accuracy
from memfit.transfer.synthesize import generate_candidates, rejection_sample
from memfit.transfer.training import (
    fit,
    load_adapted,
    load_checkpoint,
    read_jsonl,
    save_merged,
    write_json,
    write_jsonl,
)

log = logging.getLogger(__name__)


def _free(*objs: Any) -> None:
    del objs
    gc.collect()


def teacher_dir(ctx: Context, stage: str) -> Path:
    """The source + LoRA checkpoint (trained by stage source_lora, or the `source_lora.from_path` it recorded)."""
    art = ctx.require("source_lora", stage)
    meta = (art / "metrics.json").read_text()
    import json

    p = Path(json.loads(meta)["model_dir"])
    return p if p.is_absolute() else art / p


def max_item_tokens(tok: Any, texts: list[str], factor: float, extra: int = 8) -> int:
    """Generation budget for one list item: `factor` x the longest seed in this tokenizer's tokens."""
    return int(factor * max(len(tok.encode(t, add_special_tokens=False)) for t in texts)) + extra


def synthesize_with(model: Any, tok: Any, ctx: Context, n: int, judge: Any, exclude: list[str], desc: str,
                    allow_partial: bool = False, max_candidates: int | None = None):
    c = ctx.cfg.synthesize
    rng = random.Random(f"{ctx.cfg.seed}/{desc}")
    budget = max_item_tokens(tok, ctx.seeds, float(c.item_token_factor))
    torch.manual_seed(int(ctx.cfg.seed))

    def round_(size: int) -> list[str | None]:
        return generate_candidates(model, tok, ctx.seeds, int(c.k), size, rng, budget, int(c.batch_size),
                                   float(c.temperature), float(c.top_p), desc=desc)

    max_candidates = max_candidates or (int(c.max_candidates) if c.get("max_candidates") else int(c.budget_factor) * n)
    return rejection_sample(round_, judge, n, int(c.round_size), max_candidates, exclude, allow_partial)


def slug(name: str) -> str:
    """A file-name-safe form of a model label: 'source + LoRA' -> 'source_plus_LoRA'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name.replace("+", "plus")).strip("_")


# ------------------------------------------------------------------------------------------------------ 1 source
def source_lora(ctx: Context, out: Path) -> dict[str, Any]:
    c = ctx.cfg.source_lora
    if c.get("from_path"):
        p = Path(c.from_path).expanduser().resolve()
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"source_lora.from_path={str(p)!r} is not an HF checkpoint directory "
                                    "(the fine-tuned source, adapters merged)")
        return {"model_dir": str(p), "trained": False}
    model, tok = load_adapted(ctx.cfg.source, ctx.cfg.source_adapter, ctx.cfg.storage, ctx.cache_dir)
    rows = [{"prompt": format_prompt(e["input"]), "completion": f" {e['target']}", "target": e["target"],
             "task": ctx.task} for e in ctx.train]
    metrics = fit(model, tok, rows, c, ctx.cfg, ctx.logger, "source_lora")
    save_merged(model, tok, out / "model")
    return metrics | {"model_dir": "model", "trained": True, "n_train": len(rows)}


# ----------------------------------------------------------------------------------------------- 2 discriminator
def discriminator(ctx: Context, out: Path) -> dict[str, Any]:
    c = ctx.cfg.discriminator
    check_choice("discriminator.base", c.base, ("source", "target"))
    base_cfg = ctx.cfg[c.base]
    model, tok = build_model(base_cfg, ctx.cache_dir)
    model.to(ctx.device)
    real = [e["input"] for e in ctx.train]
    n_syn = int(c.n_synthetic or len(real))
    log.info("[discriminator] %s base writes %d negative (synthetic) inputs", c.base, n_syn)
    budget = int(c.max_candidates) if c.get("max_candidates") else int(ctx.cfg.synthesize.budget_factor) * n_syn
    neg = synthesize_with(model, tok, ctx, n_syn, None, real, desc="disc negatives", allow_partial=True,
                          max_candidates=budget).unfiltered[:n_syn]
    if len(neg) < n_syn:
        log.warning("[discriminator] only %d of %d negatives within %d prompts: training on those", len(neg), n_syn,
                    budget)
    write_jsonl(out / "negatives.jsonl", [{"input": x} for x in neg])
    (rt, st), (rh, sh) = D.split_heldout(real, neg, float(c.heldout), int(ctx.cfg.seed))
    model = adapt(model, ctx.cfg.disc_adapter, ctx.cfg.storage)
    metrics = fit(model, tok, D.disc_rows(rt, st, ctx.task), c, ctx.cfg, ctx.logger, "discriminator")
    yes, no = D.judge(model, tok, rh + sh, ctx.task, int(ctx.cfg.synthesize.batch_size))
    is_real = torch.tensor([1] * len(rh) + [0] * len(sh))
    metrics["heldout_acc"] = D.accuracy(yes, no, is_real)
    metrics["heldout_real_kept"] = float((yes > no)[: len(rh)].double().mean())
    metrics["heldout_synthetic_kept"] = float((yes > no)[len(rh):].double().mean())
    save_merged(model, tok, out / "model")
    return metrics | {"n_real": len(real), "n_synthetic": len(neg)}


# --------------------------------------------------------------------------------------------------- 3 synthesize
def synthesize(ctx: Context, out: Path) -> dict[str, Any]:
    c = ctx.cfg.synthesize
    n = int(c.n or len(ctx.train))
    model, tok = build_model(ctx.cfg.target, ctx.cache_dir)
    model.to(ctx.device)
    judge = None
    if c.filter:
        disc, dtok = load_checkpoint(ctx.require("discriminator", "synthesize") / "model")
        disc.to(ctx.device)

        def judge(xs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            return D.judge(disc, dtok, xs, ctx.task, int(c.batch_size))

    res = synthesize_with(model, tok, ctx, n, judge, list(ctx.seeds), desc="synthesize",
                          allow_partial=bool(c.allow_partial))
    write_jsonl(out / "candidates.jsonl", res.candidates)
    write_jsonl(out / "filtered.jsonl", [{"input": x} for x in res.kept[:n]])
    write_jsonl(out / "unfiltered.jsonl", [{"input": x} for x in res.unfiltered[:n]])
    return res.stats() | {"n_requested": n, "filter": bool(c.filter)}


# ------------------------------------------------------------------------------------------------------ 4 distill
def distill(ctx: Context, out: Path, variant: str) -> dict[str, Any]:
    c = ctx.cfg.distill
    if variant == "seeds":
        inputs = list(ctx.seeds)
    else:
        inputs = [r["input"] for r in read_jsonl(ctx.require("synthesize", "distill") / f"{variant}.jsonl")]
    teacher, ttok = load_checkpoint(teacher_dir(ctx, "distill"))
    teacher.to(ctx.device)
    rows = teacher_rows(teacher, ttok, inputs, ctx.task, int(c.teacher_max_new_tokens), int(c.batch_size))
    write_jsonl(out / "teacher_data.jsonl", rows)
    if not rows:
        raise RuntimeError(f"the teacher gave an empty answer for all {len(inputs)} {variant} inputs: nothing to distill")
    model, tok = load_adapted(ctx.cfg.target, ctx.cfg.target_adapter, ctx.cfg.storage, ctx.cache_dir)
    kl = float(c.kl_weight)
    if kl > 0 and not same_vocabulary(ttok, tok):
        raise ValueError("distill.kl_weight > 0 needs source and target with the same tokenizer (token-level KL); "
                         f"{ctx.cfg.source.get('name')} and {ctx.cfg.target.get('name')} differ: set distill.kl_weight=0")
    metrics = fit(model, tok, [{k: r[k] for k in ("prompt", "completion", "target", "task")} for r in rows], c,
                  ctx.cfg, ctx.logger, f"distill_{variant}", module_cls=DistillModule, teacher=teacher, kl_weight=kl)
    save_merged(model, tok, out / "model")
    if c.get("export_peft") and ctx.cfg.target_adapter.get("name", "none") != "none":
        from memfit.adapters import export_peft

        export_peft(model, out / "peft")
    _free(teacher, model)
    return metrics | {"variant": variant, "n_inputs": len(inputs), "n_rows": len(rows), "kl_weight": kl}


# ----------------------------------------------------------------------------------------------------- 5 evaluate
def evaluate(ctx: Context, out: Path) -> dict[str, Any]:
    c = ctx.cfg.evaluate
    bs = int(c.batch_size)
    models: dict[str, Any] = {"source": lambda: build_model(ctx.cfg.source, ctx.cache_dir),
                              "source + LoRA": lambda: load_checkpoint(teacher_dir(ctx, "evaluate")),
                              "target": lambda: build_model(ctx.cfg.target, ctx.cache_dir)}
    for v in ("filtered", "unfiltered", "seeds"):
        if ctx.artefact(f"distill_{v}").is_dir():
            models[f"target + transferred ({v})"] = lambda v=v: load_checkpoint(ctx.artefact(f"distill_{v}") / "model")
    acc: dict[str, float] = {}
    for name, load in models.items():
        model, tok = load()
        model.to(ctx.device)
        acc[name], preds = task_accuracy(model, tok, ctx.test, bs, desc=f"eval {name}")
        write_jsonl(out / f"predictions_{slug(name)}.jsonl", preds)
        log.info("[evaluate] %s: %.3f", name, acc[name])
        _free(model)
    mmd = None
    syn = ctx.artefact("synthesize")
    if c.mmd and syn.is_dir():
        from memfit.transfer.mmd import SentenceEncoder

        enc = SentenceEncoder(c.get("encoder_path"))
        sets = {"filtered": [r["input"] for r in read_jsonl(syn / "filtered.jsonl")],
                "unfiltered": [r["input"] for r in read_jsonl(syn / "unfiltered.jsonl")]}
        n = min(len(ctx.test), *(len(v) for v in sets.values()))
        real = enc.encode([e["input"] for e in ctx.test[:n]], desc="embed real")
        emb = {k: enc.encode(v[:n], desc=f"embed {k}") for k, v in sets.items() if len(v) >= 2}
        mmd = mmd_report(real, emb) | {"n": n}
        plot_embeddings({"real": real, **emb}, out / "embeddings.png", f"{ctx.task}: MiniLM embeddings (PCA)")
    write_json(out / "results.json", {"task": ctx.task, "accuracy": acc, "mmd2": mmd})
    (out / "report.md").write_text(markdown_table(ctx.task, acc, mmd))
    flat = {f"acc/{k}": v for k, v in acc.items()}
    if mmd:
        flat |= {f"mmd2/{k}": v for k, v in mmd.items() if k in ("filtered", "unfiltered")}
    return flat
