"""Trans-LoRA does what it is for, on a tiny generated task with labels known by construction: an adapter transferred
by distillation (the teacher's greedy answers to inputs the target never saw labelled) beats the untuned target base
on a held-out set and comes close to the teacher; the discriminator tells real inputs from synthetic ones of a
distinguishable distribution, judged against the construction labels; `mmd_report` against float64 loops.

The task: the input is 3 letters from "abcdefgh", the answer its first letter. Real, synthetic and held-out inputs are
disjoint sets of strings. Margins come from the sample size: with n held-out items an accuracy has standard error at
most sqrt(0.25 / n), a difference of two independent ones at most sqrt(0.5 / n); we ask for 3 of those.

The bases are random-init tiny Llamas with initializer_range 0.1 (HF's default 0.02 leaves a frozen lm_head whose
logits cannot exceed about +-1.3, so no adapter could express a confident answer; a pretrained base has no such cap,
and the wider init stands in for pre-training at no cost).
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from memfit.config import compose

LETTERS = "abcdefgh"
ARCH = ["arch.intermediate_size=96", "arch.num_hidden_layers=2", "arch.num_attention_heads=2",
        "arch.num_key_value_heads=1"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cfg(tmp_path: Path):
    return compose("transfer", [
        "model@source=tiny", "model@target=tiny", "source.pretrained=false", "target.pretrained=false",
        "source.arch.hidden_size=48", "target.arch.hidden_size=64", "target.init_seed=1",
        *[f"source.{a}" for a in ARCH], *[f"target.{a}" for a in ARCH], "+source.arch.initializer_range=0.1",
        "+target.arch.initializer_range=0.1", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", f"run_dir={tmp_path}/run", f"paths.output_dir={tmp_path}/run",
        f"paths.cache_dir={tmp_path}/cache", "source_adapter.progress=false", "target_adapter.progress=false",
        "disc_adapter.progress=false"])


def strings(alphabet: str, seed: int) -> list[str]:
    """Every 3-letter string over `alphabet`, shuffled."""
    xs = ["".join(t) for t in itertools.product(alphabet, repeat=3)]
    random.Random(seed).shuffle(xs)
    return xs


def sample_margin(n: int) -> float:
    """3 worst-case standard errors of a difference of two accuracies on n items each."""
    return 3 * math.sqrt(0.5 / n)


def test_transferred_adapter_beats_the_untuned_target(cfg, tmp_path: Path) -> None:
    from memfit.data.collate import format_prompt
    from memfit.transfer.distill import DistillModule, teacher_rows
    from memfit.transfer.evaluate import task_accuracy
    from memfit.transfer.training import fit, load_adapted, load_checkpoint, save_merged

    xs = strings(LETTERS, 0)
    real, synthetic, heldout = xs[:64], xs[64:128], xs[128:188]  # disjoint
    test = [{"input": x, "target": x[0]} for x in heldout]
    n = len(test)
    train = OmegaConf.create({"steps": 150, "lr": 3e-3, "batch_size": 16, "max_length": 64})

    # 1. the teacher: source base + LoRA on the real, labelled task data
    src, stok = load_adapted(cfg.source, cfg.source_adapter, cfg.storage, tmp_path / "cache")
    rows = [{"prompt": format_prompt(x), "completion": f" {x[0]}", "target": x[0], "task": "first"} for x in real]
    fit(src, stok, rows, OmegaConf.merge(train, {"lr": 1e-2}), cfg, None, "source_lora")
    save_merged(src, stok, tmp_path / "teacher")
    teacher, ttok = load_checkpoint(tmp_path / "teacher")
    acc_teacher, _ = task_accuracy(teacher, ttok, test)

    # 2. the transfer: the teacher answers unlabelled inputs; a target LoRA learns those answers (the distill stage)
    answers = teacher_rows(teacher, ttok, synthetic, "first", 8, 32)
    assert [r["input"] for r in answers] == synthetic[: len(answers)]
    tgt, tok = load_adapted(cfg.target, cfg.target_adapter, cfg.storage, tmp_path / "cache")
    acc_base, _ = task_accuracy(tgt.eval(), tok, test)
    fit(tgt.train(), tok, [{k: r[k] for k in ("prompt", "completion", "target", "task")} for r in answers],
        OmegaConf.merge(train, {"lr": 1e-2}), cfg, None, "distill", module_cls=DistillModule, teacher=teacher,
        kl_weight=0.0)
    save_merged(tgt, tok, tmp_path / "student")
    student, stok2 = load_checkpoint(tmp_path / "student")
    acc_student, preds = task_accuracy(student, stok2, test)
    # the accuracy is the exact-match rate of the held-out answers against the construction labels
    assert acc_student == sum(p["prediction"] == p["input"][0] for p in preds) / n

    margin = sample_margin(n)
    assert acc_teacher >= acc_base + margin, (acc_teacher, acc_base)  # there is something to transfer
    assert acc_student >= acc_base + margin, (acc_student, acc_base, margin)
    assert acc_student >= acc_teacher - margin, (acc_student, acc_teacher, margin)


def test_discriminator_separates_real_from_synthetic_by_construction(cfg, tmp_path: Path) -> None:
    """Real inputs: 3 letters of "abcdefgh"; synthetic: 3 letters of "stuvwxyz" (what a poor generator would
    write). The verdicts on held-out inputs of both kinds are scored against those construction labels, and the
    synthesize filter (keep_rule) keeps real-looking candidates at a higher rate than synthetic ones."""
    from memfit.transfer import discriminate as D
    from memfit.transfer.synthesize import keep_rule
    from memfit.transfer.training import fit, load_adapted

    real, fake = strings(LETTERS, 1), strings("stuvwxyz", 2)
    (rt, st), (rh, sh) = (real[:48], fake[:48]), (real[48:88], fake[48:88])
    model, tok = load_adapted(cfg.source, cfg.disc_adapter, cfg.storage, tmp_path / "cache")
    fit(model, tok, D.disc_rows(rt, st, "first letter"), OmegaConf.create(
        {"steps": 150, "lr": 1e-2, "batch_size": 16, "max_length": 96}), cfg, None, "discriminator")
    model.eval()
    yes, no = D.judge(model, tok, rh + sh, "first letter")
    truth = torch.tensor([1] * len(rh) + [0] * len(sh))
    n = len(truth)
    acc = float(((yes > no).long() == truth).double().mean())
    assert D.accuracy(yes, no, truth) == acc
    assert acc >= 0.5 + 3 * math.sqrt(0.25 / n), acc  # chance is 0.5 on this balanced set
    kept = keep_rule(yes, no)
    real_rate, fake_rate = float(kept[: len(rh)].double().mean()), float(kept[len(rh):].double().mean())
    assert real_rate >= fake_rate + sample_margin(len(rh)), (real_rate, fake_rate)


def test_mmd_report_matches_float64_loops() -> None:
    """`mmd_report`: one bandwidth for every set, the median of all pairwise distances over the pooled points, and
    each unbiased MMD^2 to the real set, against plain float64 loops (relative 1e-10: sums of at most 10^3 terms of
    size <= 1 in float64)."""
    from memfit.transfer.evaluate import mmd_report

    rng = np.random.default_rng(4)
    real = rng.normal(size=(10, 4))
    sets = {"near": rng.normal(0.1, 1.0, size=(8, 4)), "far": rng.normal(2.0, 1.0, size=(9, 4))}
    pooled = np.concatenate([real, *sets.values()])
    sigma = float(np.median([np.linalg.norm(pooled[i] - pooled[j]) for i in range(len(pooled))
                             for j in range(i + 1, len(pooled))]))

    def k(a, b):
        return math.exp(-float(np.sum((a - b) ** 2)) / (2 * sigma**2))

    def unbiased(x, y):
        n, m = len(x), len(y)
        xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        return xx + yy - 2 * sum(k(a, b) for a in x for b in y) / (n * m)

    got = mmd_report(torch.tensor(real), {k_: torch.tensor(v) for k_, v in sets.items()})
    assert got["sigma"] == pytest.approx(sigma, rel=1e-12)
    for name, z in sets.items():
        assert got[name] == pytest.approx(unbiased(real, z), rel=1e-10, abs=1e-12), name
    assert got["far"] > got["near"]
