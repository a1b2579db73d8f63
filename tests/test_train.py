"""End-to-end training jobs on CPU: every data type, resume equality, metrics, sweeps, bad overrides."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from refs import Reference, check_run

from conftest import FAST, ROOT, TASK_FAST
from memfit.train import run


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def test_fast_dev_run_tasks(fast_cfg):
    """The reported train loss, test loss and test accuracy against float64 recomputations (tests/helpers/refs.py); the
    parameter count against the architecture's closed form (FAST: vocab V, hidden 32, kv 16, mlp 64, 2 layers)."""
    ref = Reference()
    res = run(fast_cfg("trainer.fast_dev_run=true", "data.tasks=[navigate,word_sorting]"), callbacks=[ref])
    v = res["module"].model.config.vocab_size
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32
    assert res["trainable_params"] == res["total_params"] == 2 * v * 32 + 2 * per_layer + 32
    check_run(res, ref, steps=1)
    assert ref.total == 8  # data.n_test: every test prompt was scored


def test_fast_dev_run_jsonl(fast_cfg, tmp_path):
    for split in ("train", "val"):
        with open(tmp_path / f"{split}.jsonl", "w") as fh:
            for i in range(20):
                fh.write(json.dumps({"prompt": f"Echo {i}:", "completion": f" {i}"}) + "\n")
    res = run(fast_cfg("data=jsonl", f"data.train_file={tmp_path}/train.jsonl", f"data.val_file={tmp_path}/val.jsonl",
                       "data.batch_size=4", "trainer.fast_dev_run=true"), callbacks=[ref := Reference()])
    check_run(res, ref, steps=1)


def test_fast_dev_run_text(fast_cfg, tmp_path):
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"paragraph {i} " + "lorem ipsum " * 20 for i in range(40)))
    res = run(fast_cfg("data=text", f"data.files=[{tmp_path}/corpus.txt]", "data.max_length=64",
                       "trainer.fast_dev_run=true", "eval.test=false"), callbacks=[ref := Reference()])
    check_run(res, ref, steps=1)


def test_completion_only_labels(fast_cfg):
    from hydra.utils import instantiate

    from memfit.models.tokenizer import char_tokenizer

    cfg = fast_cfg()
    dm = instantiate(cfg.data)
    tok = char_tokenizer()
    dm.set_tokenizer(tok)
    dm.setup()
    row = dm.splits["train"][0]
    labelled = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    # exactly " <answer></s>" is trained on; the prompt never is
    assert tok.decode(labelled[:-1]) == " " + row["target"] and labelled[-1] == tok.eos_token_id
    assert tok.decode(row["input_ids"][: len(row["prompt_ids"])]).startswith("Q: ")


def _resume_cfg(fast_cfg, tmp_path, steps):
    cfg = fast_cfg("data.n_train=40", "data.batch_size=8", f"trainer.max_steps={steps}", "trainer.val_check_interval=3",
                   "eval.test=false", "callbacks=default", "~callbacks.progress", "~callbacks.lr_monitor",
                   "callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.model_checkpoint.save_top_k=-1",
                   "optim.lr=3e-3", "scheduler.warmup_steps=2")
    cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def test_resume_from_checkpoint_gives_identical_losses(fast_cfg, tmp_path):
    """Resume mid-epoch (step 3 of a 5-batch epoch) and across the epoch boundary: same losses as uninterrupted, and
    Lightning sees a resumable loader (no 'dataloader is not resumable' warning)."""
    rec_full, rec_resumed = LossRecorder(), LossRecorder()
    run(_resume_cfg(fast_cfg, tmp_path, 8), callbacks=[rec_full])
    ckpt = tmp_path / "run" / "checkpoints" / "step000003.ckpt"
    assert ckpt.is_file()
    cfg = _resume_cfg(fast_cfg, tmp_path / "second", 8)
    cfg.ckpt_path = str(ckpt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(cfg, callbacks=[rec_resumed])
    assert not [w for w in caught if "resumable" in str(w.message) or "different training data" in str(w.message)]
    assert sorted(rec_resumed.losses) == [4, 5, 6, 7, 8]
    for step in rec_resumed.losses:
        assert rec_resumed.losses[step] == rec_full.losses[step], step


def test_accuracy_metric_on_known_predictions(fast_cfg, monkeypatch):
    """test/acc equals the exact-match rate of predictions we choose, per task and overall."""
    from memfit.module import LMModule, first_line

    assert first_line("  True\nQ: more") == "True"
    cfg = fast_cfg("data.tasks=[boolean_expressions,navigate]", "data.n_test=6", "trainer.max_steps=1")
    truth: dict[str, str] = {}

    def fake_generate(self, prompt_ids, prompt_mask, max_new_tokens):
        out = []
        for row, m in zip(prompt_ids, prompt_mask):
            text = self.tokenizer.decode(row[m.bool()])
            answer = truth[text]
            out.append(answer if answer in ("True", "Yes") else "wrong")  # right exactly when the answer is True/Yes
        return out

    from hydra.utils import instantiate

    from memfit.data.collate import format_prompt
    from memfit.data.tasks import generate_split

    data = instantiate(cfg.data)
    for t in ("boolean_expressions", "navigate"):
        for e in generate_split(t, "test", 6, seed=cfg.seed):
            truth[format_prompt(e["input"])] = e["target"]
    monkeypatch.setattr(LMModule, "generate_answers", fake_generate)
    res = run(cfg)
    expected = {t: sum(v in ("True", "Yes") for k, v in truth.items() if ("is" if t == "boolean_expressions" else
                "Options") in k) / 6 for t in ("boolean_expressions", "navigate")}
    assert res["after"]["test/acc/boolean_expressions"] == pytest.approx(expected["boolean_expressions"])
    assert res["after"]["test/acc/navigate"] == pytest.approx(expected["navigate"])
    assert res["after"]["test/acc"] == pytest.approx(sum(expected.values()) / 2)
    del data


def test_multirun_sweeps_two_values(tmp_path):
    cmd = [sys.executable, "-m", "memfit.train", "-m", "optim.lr=1e-3,2e-3", *FAST, *TASK_FAST, "trainer.fast_dev_run=true",
           f"paths.cache_dir={tmp_path}/cache", f"hydra.sweep.dir={tmp_path}/sweep", "eval.test=false"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert runs == ["0", "1"]
    lrs = [OmegaConf.load(tmp_path / "sweep" / r / ".hydra" / "config.yaml").optim.lr for r in runs]
    assert lrs == [1e-3, 2e-3]


def test_unknown_group_option_lists_valid_ones(fast_cfg):
    with pytest.raises(MissingConfigException) as e:
        fast_cfg("adapter=nonexistent")
    assert "adapter" in str(e.value) and "none" in str(e.value)


def test_unknown_field_is_rejected(fast_cfg):
    with pytest.raises(ConfigCompositionException, match="optim.lrr"):
        fast_cfg("optim.lrr=1")


def test_wrong_field_type_names_the_field(fast_cfg):
    with pytest.raises(TypeError, match=r"trainer.max_steps='abc' has the wrong type"):
        run(fast_cfg("trainer.max_steps=abc"))


def test_missing_model_path_is_named(fast_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path="):
        run(fast_cfg("model=llama", f"model.path={tmp_path}/nope"))
    with pytest.raises(Exception, match="model.path"):
        run(fast_cfg("model=llama"))  # mandatory value left unset


def test_local_checkpoint_round_trip(fast_cfg, tmp_path):
    """A model saved by one run loads through model.path with identical weights."""
    cfg = fast_cfg("trainer.max_steps=2", "eval.test=false", f"save_model={tmp_path}/saved")
    res = run(cfg)
    from memfit.models.build import load_local

    model, tok = load_local(tmp_path / "saved", torch.float32)
    assert len(tok) == model.config.vocab_size
    res2 = run(fast_cfg("model=llama", f"model.path={tmp_path}/saved", "model.dtype=float32", "trainer.max_steps=1",
                        "eval.test=false"))
    assert res2["total_params"] == res["total_params"]


def test_pretrained_base_is_built_once_and_cached(fast_cfg, tmp_path):
    from memfit.models.build import build_model
    from memfit.models.pretrain import ensure_pretrained

    cfg = fast_cfg("model.pretrained=true")
    cfg.model.recipe_overrides = ["trainer.max_steps=2", "data.n_docs=30", "data.max_length=64", "data.batch_size=4"]
    path = ensure_pretrained(cfg.model, tmp_path / "cache")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    model, tok = build_model(cfg.model, tmp_path / "cache")
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    fresh, _ = build_model(OmegaConf.merge(cfg.model, {"pretrained": False}), tmp_path / "cache")
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))  # it did train
