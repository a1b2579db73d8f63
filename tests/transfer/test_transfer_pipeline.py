"""The Trans-LoRA pipeline end to end on CPU with two tiny bases pre-trained by the framework's recipe (char-level
source, byte-level-BPE target: the cross-tokenizer path), plus stage skipping, resume after a crash, stage subsets,
the token-level KL path and bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from memfit.config import compose

STAGE_DIRS = ["source_lora", "discriminator", "synthesize", "distill_filtered", "distill_unfiltered", "distill_seeds",
              "evaluate"]
RECIPE = ["data.tasks=boolean_expressions", "data.list_docs=0.5", "data.n_docs=300", "data.max_length=128",
          "data.batch_size=8", "trainer.max_steps=150", "trainer.val_check_interval=150",
          "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
ARCH = ["arch.intermediate_size=96", "arch.num_hidden_layers=2", "arch.num_attention_heads=2",
        "arch.num_key_value_heads=1"]


def overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    recipe = "[" + ",".join(f"'{o}'" for o in RECIPE) + "]"
    return [
        f"run_dir={run_dir}", f"paths.output_dir={run_dir}", f"paths.cache_dir={cache}", "logger=csv",
        "model@source=tiny", "model@target=tiny", "source.name=tsrc", "source.arch.hidden_size=48",
        *[f"source.{a}" for a in ARCH], f"source.recipe_overrides={recipe}",
        "target.name=ttgt", "target.tokenizer=bpe", "target.arch.hidden_size=64",
        *[f"target.{a}" for a in ARCH], f"target.recipe_overrides={recipe}",
        "data.n_train=40", "data.n_test=16", "source_lora.steps=20", "discriminator.steps=100", "discriminator.lr=1e-2", "distill.steps=20",
        "source_lora.batch_size=8", "discriminator.batch_size=8", "distill.batch_size=8",
        "synthesize.n=6", "discriminator.n_synthetic=12", "synthesize.round_size=32", "synthesize.max_candidates=480",
        "distill.variants=[filtered,unfiltered,seeds]", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """One full pipeline run (all stages, all distill variants); tests copy its directory before changing it."""
    from memfit.transfer.pipeline import run

    root = tmp_path_factory.mktemp("translora")
    run_dir, cache = root / "run", root / "cache"
    results = run(compose("transfer", overrides(run_dir, cache)))
    return run_dir, cache, results


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def test_end_to_end_produces_every_artefact(done_run):
    from memfit.transfer.synthesize import keep_rule

    run_dir, _, results = done_run
    for d in STAGE_DIRS:
        assert (run_dir / d).is_dir() and not (run_dir / f"{d}.tmp").exists()
        assert (run_dir / d / "metrics.json").is_file()
    for d in ("source_lora", "discriminator", "distill_filtered", "distill_unfiltered", "distill_seeds"):
        assert (run_dir / d / "model" / "config.json").is_file()
    # the held-out accuracy is the saved discriminator's, against the labels known by construction (real task inputs
    # vs the negatives it was shown), on the same split; the merged checkpoint may flip a verdict within fp32 rounding
    # of a tie, hence one item of slack
    from memfit.transfer import discriminate as D
    from memfit.transfer.training import load_checkpoint

    real = [e["input"] for e in task_split("train", 40)]
    neg = [r["input"] for r in read_jsonl(run_dir / "discriminator" / "negatives.jsonl")]
    _, (rh, sh) = D.split_heldout(real, neg, 0.2, 0)
    disc, dtok = load_checkpoint(run_dir / "discriminator" / "model")
    yes, no = D.judge(disc, dtok, rh + sh, "boolean_expressions")
    truth = torch.tensor([1] * len(rh) + [0] * len(sh))
    acc = float(((yes > no).long() == truth).double().mean())
    assert abs(results["discriminator"]["heldout_acc"] - acc) <= 1 / len(truth) + 1e-12

    cands = read_jsonl(run_dir / "synthesize" / "candidates.jsonl")
    filtered = [r["input"] for r in read_jsonl(run_dir / "synthesize" / "filtered.jsonl")]
    unfiltered = [r["input"] for r in read_jsonl(run_dir / "synthesize" / "unfiltered.jsonl")]
    assert len(filtered) == len(unfiltered) == 6
    # the filter rule on the stored verdicts, and the kept set is exactly the first 6 candidates that pass it
    verdicts = keep_rule(torch.tensor([c["logp_yes"] for c in cands]), torch.tensor([c["logp_no"] for c in cands]))
    assert [c["kept"] for c in cands] == verdicts.tolist()
    assert filtered == [c["input"] for c in cands if c["logp_yes"] > c["logp_no"]][:6]
    assert unfiltered == [c["input"] for c in cands][:6]
    assert len({c["input"] for c in cands}) == len(cands)
    stats = json.loads((run_dir / "synthesize" / "metrics.json").read_text())
    assert stats["acceptance_rate"] == pytest.approx(sum(verdicts.tolist()) / len(cands))

    ev = json.loads((run_dir / "evaluate" / "results.json").read_text())
    names = ["source", "source + LoRA", "target", "target + transferred (filtered)",
             "target + transferred (unfiltered)", "target + transferred (seeds)"]
    assert list(ev["accuracy"]) == names
    preds = read_jsonl(run_dir / "evaluate" / "predictions_source_plus_LoRA.jsonl")
    assert len(preds) == 16
    written = sorted(p.name for p in (run_dir / "evaluate").glob("predictions_*.jsonl"))
    assert written == ["predictions_source.jsonl", "predictions_source_plus_LoRA.jsonl", "predictions_target.jsonl",
                       "predictions_target_plus_transferred_filtered.jsonl",
                       "predictions_target_plus_transferred_seeds.jsonl",
                       "predictions_target_plus_transferred_unfiltered.jsonl"]
    assert ev["accuracy"]["source + LoRA"] == pytest.approx(sum(p["prediction"] == p["target"] for p in preds) / 16)
    assert set(ev["mmd2"]) == {"filtered", "unfiltered", "sigma", "n"}
    check_mmd(ev["mmd2"], run_dir)
    assert (run_dir / "evaluate" / "embeddings.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| target + transferred (filtered) |" in (run_dir / "evaluate" / "report.md").read_text()
    # every stage logged to the configured (csv) logger under its own prefix
    rows = list(csv.DictReader(next(run_dir.rglob("metrics.csv")).open()))
    keys = {k for r in rows for k, v in r.items() if v}
    for prefix in ("source_lora/train/loss", "discriminator/heldout_acc", "synthesize/acceptance_rate",
                   "distill_filtered/train/loss", "evaluate/acc/target"):
        assert prefix in keys, prefix


def task_split(split: str, n: int) -> list[dict]:
    """The task examples the run used (generated deterministically from the run's seed 0; see overrides)."""
    from memfit.data.tasks import generate_split

    return generate_split("boolean_expressions", split, n, seed=0)


def check_mmd(mmd: dict, run_dir: Path) -> None:
    """The reported MMD^2 values against float64 loops over MiniLM embeddings of the same texts: the real inputs
    (the test split's first n) against each synthetic set, one bandwidth = the median pooled pairwise distance."""
    import math

    import numpy as np

    from memfit.transfer.mmd import SentenceEncoder

    n = mmd["n"]
    enc = SentenceEncoder()
    real = enc.encode([e["input"] for e in task_split("test", 16)[:n]]).numpy()
    sets = {k: enc.encode([r["input"] for r in read_jsonl(run_dir / "synthesize" / f"{k}.jsonl")][:n]).numpy()
            for k in ("filtered", "unfiltered")}
    pooled = np.concatenate([real, *sets.values()])
    sigma = float(np.median([np.linalg.norm(pooled[i] - pooled[j]) for i in range(len(pooled))
                             for j in range(i + 1, len(pooled))]))
    assert mmd["sigma"] == pytest.approx(sigma, rel=1e-6)

    def k(a, b):
        return math.exp(-float(np.sum((a - b) ** 2)) / (2 * sigma**2))

    for name, z in sets.items():
        xx = sum(k(real[i], real[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        yy = sum(k(z[i], z[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        xy = sum(k(a, b) for a in real for b in z) / (n * n)
        # the embeddings are recomputed (float32 encoder, same inputs): agreement to ~1e-6 of the kernel values
        assert mmd[name] == pytest.approx(xx + yy - 2 * xy, abs=1e-5), name


def test_cross_tokenizer_distillation_uses_teacher_text(done_run):
    """The student (BPE) trains on the teacher's (char-level) greedy answers, checked with a plain greedy loop."""
    from memfit.data.collate import format_prompt
    from memfit.models.build import load_local
    from memfit.transfer.distill import same_vocabulary

    run_dir, _, _ = done_run
    teacher, ttok = load_local(run_dir / "source_lora" / "model", torch.float32)
    student, stok = load_local(run_dir / "distill_filtered" / "model", torch.float32)
    assert not same_vocabulary(ttok, stok)
    rows = read_jsonl(run_dir / "distill_filtered" / "teacher_data.jsonl")
    assert rows
    for r in rows[:2]:
        ids = ttok.encode(format_prompt(r["input"]), add_special_tokens=False)
        n0, out = len(ids), ""
        for _ in range(48):
            with torch.no_grad():
                nxt = int(teacher(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            out = ttok.decode(ids[n0:], skip_special_tokens=True)
            if nxt == ttok.eos_token_id or "\n" in out:
                break
        assert r["completion"] == " " + out.split("\n")[0].strip()
        assert r["prompt"] == format_prompt(r["input"])


def test_resume_skips_done_stages_and_finishes_a_crashed_one(done_run, tmp_path, monkeypatch):
    from memfit.transfer import stages
    from memfit.transfer.pipeline import run

    src, cache, results = done_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    cfg = compose("transfer", overrides(run_dir, cache))
    stamps = {d: (run_dir / d / "metrics.json").stat().st_mtime_ns for d in STAGE_DIRS}
    again = run(cfg)  # everything exists: nothing runs, the stored metrics come back
    assert {d: (run_dir / d / "metrics.json").stat().st_mtime_ns for d in STAGE_DIRS} == stamps
    assert again["synthesize"] == json.loads((run_dir / "synthesize" / "metrics.json").read_text())

    shutil.rmtree(run_dir / "distill_seeds")
    shutil.rmtree(run_dir / "evaluate")

    def crash(ctx, out):
        (out / "partial.txt").write_text("half done")
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(stages, "evaluate", crash)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert (run_dir / "distill_seeds" / "model").is_dir()  # finished before the crash
    assert (run_dir / "evaluate.tmp" / "partial.txt").is_file() and not (run_dir / "evaluate").exists()
    monkeypatch.undo()
    run(compose("transfer", overrides(run_dir, cache, "stages=[evaluate]")))
    assert (run_dir / "evaluate" / "results.json").is_file() and not (run_dir / "evaluate.tmp").exists()
    for d in ("source_lora", "discriminator", "synthesize", "distill_filtered"):
        assert (run_dir / d / "metrics.json").stat().st_mtime_ns == stamps[d]


def test_stage_subset_needs_its_inputs_and_task_must_match(done_run, tmp_path):
    from memfit.transfer.pipeline import run

    src, cache, _ = done_run
    with pytest.raises(FileNotFoundError, match=r"stage distill needs .*synthesize \(made by stage synthesize\); run it "
                                                r"first, e.g. stages=\[synthesize,distill\]"):
        run(compose("transfer", overrides(tmp_path / "new", cache, "stages=[distill]")))
    with pytest.raises(FileNotFoundError, match=r"needs .*source_lora \(made by stage source_lora\)"):
        run(compose("transfer", overrides(tmp_path / "new", cache, "stages=[distill]", "distill.variants=[seeds]")))
    with pytest.raises(ValueError, match="task: 'boolean_expressions' vs 'navigate'"):
        run(compose("transfer", overrides(src, cache, "task=navigate")))
    with pytest.raises(ValueError, match="stages\\[\\]='distil' is not a valid option"):
        run(compose("transfer", overrides(tmp_path / "x", cache, "stages=[distil]")))
    with pytest.raises(ValueError, match="only 5 seed example.*synthesize.k=6"):
        run(compose("transfer", overrides(tmp_path / "y", cache, "synthesize.k=6")))


def test_logit_kl_only_with_matching_tokenizers(done_run, tmp_path):
    from memfit.transfer.pipeline import run

    src, cache, _ = done_run
    teacher = src / "source_lora" / "model"
    common = [f"source_lora.from_path={teacher}", "stages=[source_lora,distill]", "distill.variants=[seeds]",
              "distill.kl_weight=0.5"]
    with pytest.raises(ValueError, match="kl_weight > 0 needs source and target with the same tokenizer"):
        run(compose("transfer", overrides(tmp_path / "mismatch", cache, *common)))
    # target = the source base (same char tokenizer): CE + KL trains, and the KL is logged
    same = overrides(tmp_path / "same", cache, *common)
    same = [o for o in same if not o.startswith("target.")] + [f"target.{o.split('.', 1)[1]}" for o in same
                                                                if o.startswith("source.")]
    res = run(compose("transfer", same))
    assert res["distill_seeds"]["kl_weight"] == 0.5 and res["distill_seeds"]["n_rows"] >= 1
    rows = list(csv.DictReader(next((tmp_path / "same").rglob("metrics.csv")).open()))
    kls = [float(r["distill_seeds/train/kl"]) for r in rows if r.get("distill_seeds/train/kl")]
    assert kls and all(k >= 0 for k in kls)


def test_cli_entry_point_resumes_a_finished_run(done_run, tmp_path):
    src, cache, _ = done_run
    run_dir = tmp_path / "cli"
    shutil.copytree(src, run_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    ov = [*overrides(run_dir, cache), f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run([sys.executable, "-m", "memfit.transfer", *ov], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for d in STAGE_DIRS:
        assert f"{run_dir / d} exists: skipped" in proc.stderr + proc.stdout
