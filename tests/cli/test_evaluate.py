"""`python -m memfit.cli.evaluate` and JSONL test files: a saved model, a run's checkpoint, a base + adapter and a JSONL
test file all score what the app's own test step scored (same accuracy, loss and predictions)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from refs import Reference, check_run

from conftest import FAST, MODEL_FAST, ROOT
from memfit.cli.evaluate import evaluate
from memfit.config import compose
from memfit.train import run

SUITE = ["data.n_train=64", "data.n_val=8", "data.n_test=24"]
QUIET = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "print_summary=false"]


class Capture(L.Callback):
    """The app's own test predictions (in test-loader order)."""

    def on_test_end(self, trainer, pl_module):
        self.predictions = list(pl_module.predictions)


def eval_cfg(out: Path, *overrides: str):
    return compose("evaluate", [*QUIET, "data.batch_size=8", "data.eval_batch_size=8", f"paths.output_dir={out}",
                                f"paths.cache_dir={out}/cache", *overrides])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short task-suite run of the fast model that saves its model and checkpoints: (results, captured, cfg, dir)."""
    tmp = tmp_path_factory.mktemp("app")
    cfg = compose("train", [*FAST, *SUITE, "trainer.max_steps=12", "optim.lr=3e-3", "callbacks=default",
                            "~callbacks.progress", "~callbacks.lr_monitor", f"save_model={tmp}/model",
                            f"paths.output_dir={tmp}/run", f"paths.cache_dir={tmp}/cache"])
    (tmp / "run" / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, tmp / "run" / ".hydra" / "config.yaml")  # what a Hydra run leaves beside its checkpoints
    capture = Capture()
    res = run(cfg, callbacks=[capture])
    return res, capture.predictions, cfg, tmp


def test_saved_model_scores_the_apps_test_exactly(trained, tmp_path):
    res, app_preds, _, tmp = trained
    out = evaluate(eval_cfg(tmp_path, *SUITE, "model=llama", f"model.path={tmp}/model", "model.dtype=float32"))
    after = res["after"]
    assert out["metrics"]["test/acc"] == after["test/acc"] and out["metrics"]["test/loss"] == after["test/loss"]
    written = read_jsonl(tmp_path / "predictions.jsonl")
    assert [(p["prediction"], p["target"]) for p in written] == [(p["prediction"], p["target"]) for p in app_preds]
    assert len(written) == 24 and all(p["prompt"].startswith("Q: ") and p["prompt"].endswith("\nA:") for p in written)
    # the accuracy is the exact-match rate of the written predictions, and not a degenerate one
    correct = sum(p["prediction"] == p["target"] for p in written)
    assert after["test/acc"] == pytest.approx(correct / 24) and 0 < correct < 24
    assert json.loads((tmp_path / "metrics.json").read_text())["test/acc"] == after["test/acc"]


def test_lightning_checkpoint_scores_the_apps_test(trained, tmp_path):
    res, _, _, tmp = trained
    out = evaluate(eval_cfg(tmp_path, *SUITE, f"ckpt={tmp}/run/checkpoints/last.ckpt"))
    assert out["metrics"]["test/acc"] == res["after"]["test/acc"]
    assert out["metrics"]["test/loss"] == pytest.approx(res["after"]["test/loss"], rel=1e-6)


def test_jsonl_test_file_alone_scores_like_the_suite(trained, tmp_path):
    """The suite's test items written as a JSONL file (no train or val file) score exactly as the suite does."""
    res, app_preds, _, tmp = trained
    rows = read_jsonl_items(tmp, tmp_path)
    out = evaluate(eval_cfg(tmp_path, "data=jsonl", f"data.test_file={rows}", "model=llama", f"model.path={tmp}/model",
                            "model.dtype=float32"))
    assert out["metrics"]["test/acc"] == res["after"]["test/acc"]
    assert out["metrics"]["test/loss"] == res["after"]["test/loss"]
    assert [p["prediction"] for p in out["predictions"]] == [p["prediction"] for p in app_preds]


def read_jsonl_items(tmp: Path, out: Path) -> Path:
    """The suite's test split (in its order) as JSONL rows {prompt, completion, task}, the prompt already templated."""
    from hydra.utils import instantiate

    from memfit.models.tokenizer import char_tokenizer

    dm = instantiate(compose("train", [*MODEL_FAST, *SUITE]).data)
    dm.set_tokenizer(char_tokenizer())
    dm.setup()
    test = dm.splits["test"]
    path = out / "items.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": f" {t}", "task": k}) + "\n"
                            for p, t, k in zip(test["prompt"], test["target"], test["task"])))
    return path


def test_suite_template_wraps_jsonl_prompts(tmp_path):
    from memfit.data.collate import format_prompt
    from memfit.data.datamodule import JsonlData

    (tmp_path / "a.jsonl").write_text(json.dumps({"input": "not True is", "target": "False"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"input": "True or False is", "target": "True", "task": "bx"}) + "\n")
    dm = JsonlData(test_file=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], prompt_field="input",
                   completion_field="target", template="suite")
    assert dm.rows("test") == [
        {"prompt": format_prompt("not True is"), "completion": " False", "task": "a"},
        {"prompt": "Q: True or False is\nA:", "completion": " True", "task": "bx"},
    ]
    assert dm.tasks == ["a", "bx"] and dm.has_split("test") and not dm.has_split("val")
    with pytest.raises(ValueError, match="data.template='chat' is not a valid option"):
        JsonlData(test_file="x", template="chat")


def write_echo(path: Path, n: int, offset: int = 0) -> None:
    """Rows any model can be scored on: two tasks, answer = the number in the prompt."""
    path.write_text("".join(json.dumps({"prompt": f"Echo {i}:", "completion": f" {i}", "task": f"t{i % 2}"}) + "\n"
                            for i in range(offset, offset + n)))


def test_app_scores_a_jsonl_test_file_without_val_file(fast_cfg, tmp_path):
    write_echo(tmp_path / "train.jsonl", 32)
    write_echo(tmp_path / "test.jsonl", 10, offset=100)
    capture, ref = Capture(), Reference()
    res = run(fast_cfg("data=jsonl", f"data.train_file={tmp_path}/train.jsonl", f"data.test_file={tmp_path}/test.jsonl",
                       "data.batch_size=4", "data.eval_batch_size=4", "trainer.max_steps=8"), callbacks=[capture, ref])
    preds = capture.predictions
    assert [p["target"] for p in preds] == [str(i) for i in range(100, 110)]
    for task in ("t0", "t1"):  # per-task accuracy from the rows' task field
        rows = [p for p in preds if p["task"] == task]
        assert res["after"][f"test/acc/{task}"] == pytest.approx(sum(p["prediction"] == p["target"] for p in rows) / 5)
    assert "val/loss" not in res["after"]
    check_run(res, ref, steps=8)  # train and test loss, test accuracy against float64 / plain greedy references


def test_missing_files_are_named(fast_cfg, tmp_path):
    write_echo(tmp_path / "train.jsonl", 8)
    with pytest.raises(FileNotFoundError, match=r"data.test_file='.*nope.jsonl' does not exist"):
        run(fast_cfg("data=jsonl", f"data.train_file={tmp_path}/train.jsonl", f"data.test_file={tmp_path}/nope.jsonl"))
    with pytest.raises(ValueError, match="nothing to score: data.test_file is not set"):
        evaluate(eval_cfg(tmp_path, *MODEL_FAST, "data=jsonl"))


def test_long_prompts_are_cut_from_the_left_with_a_warning(tmp_path, caplog):
    from memfit.data.datamodule import JsonlData
    from memfit.models.tokenizer import char_tokenizer

    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "x" * 40 + "END:", "completion": " ok"}) + "\n"
                                      + json.dumps({"prompt": "short:", "completion": " ok"}) + "\n")
    dm = JsonlData(test_file=str(tmp_path / "t.jsonl"), max_length=20)
    dm.set_tokenizer(char_tokenizer())
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert "1 of 2 prompts do not fit data.max_length=20" in caplog.text
    row = dm.splits["test"][0]
    assert len(row["input_ids"]) == 20 and char_tokenizer().decode(row["prompt_ids"]).endswith("END:")


def test_base_plus_adapter(tmp_path):
    """A peft LoRA directory or a file of trainable tensors on a base scores what the merged model scores."""
    from safetensors.torch import save_file

    from memfit.adapters import export_peft, merged_copy
    from memfit.assemble import assemble

    base_cfg = eval_cfg(tmp_path, *MODEL_FAST, "data.n_test=16")
    model, tok = assemble(base_cfg)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    lora = ["model=llama", f"model.path={tmp_path}/base", "model.dtype=float32", "data.n_test=16"]
    adapted, tok = assemble(eval_cfg(tmp_path, *lora, "adapter=lora", "adapter.rank=4", "adapter.progress=false"))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)  # a trained-looking adapter that changes the outputs
    export_peft(adapted, tmp_path / "peft")
    save_file({n: p.detach().contiguous() for n, p in adapted.named_parameters() if "lora_" in n},
              str(tmp_path / "trainable.safetensors"))
    merged_copy(adapted).save_pretrained(tmp_path / "merged")
    tok.save_pretrained(tmp_path / "merged")

    base_q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    merged_q = merged_copy(adapted).state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert (merged_q - base_q).abs().max() > 0.1  # the adapter changes the weights: loading it is not a no-op

    merged = evaluate(eval_cfg(tmp_path / "m", *lora[2:], "model=llama", f"model.path={tmp_path}/merged"))["metrics"]
    peft = evaluate(eval_cfg(tmp_path / "p", *lora, f"adapter_path={tmp_path}/peft"))["metrics"]
    file = evaluate(eval_cfg(tmp_path / "f", *lora, "adapter=lora", "adapter.rank=4", "adapter.progress=false",
                             f"adapter_path={tmp_path}/trainable.safetensors"))["metrics"]
    assert peft["test/loss"] == pytest.approx(merged["test/loss"], rel=1e-5)
    assert file["test/loss"] == peft["test/loss"]
    with pytest.raises(ValueError, match="needs an adapter in the model"):
        evaluate(eval_cfg(tmp_path / "x", *lora, f"adapter_path={tmp_path}/trainable.safetensors"))


def test_command_line(trained, tmp_path):
    """The module runs as `python -m memfit.cli.evaluate` with Hydra overrides and prints its table."""
    res, _, _, tmp = trained
    cmd = [sys.executable, "-m", "memfit.cli.evaluate", "model=llama", f"model.path={tmp}/model", "model.dtype=float32",
           *SUITE, "data.eval_batch_size=8", "trainer.accelerator=cpu", f"hydra.run.dir={tmp_path}/cli",
           f"paths.cache_dir={tmp_path}/cache"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "boolean_expressions" in out.stdout and "greedy exact match" in out.stdout
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["test/acc"] == res["after"]["test/acc"]
    assert len(read_jsonl(tmp_path / "cli" / "predictions.jsonl")) == 24


def test_suite_recipe_and_summary_caption(capsys):
    """experiment=suite trains on all tasks at the real lengths (base pre-trained in 512-token blocks too), and the
    summary says that test/acc is measured on the generated test split."""
    from memfit.report import print_summary

    cfg = compose("train", ["experiment=suite"])
    assert cfg.data.tasks == "all" and cfg.data.max_length == 512 == cfg.model.arch.max_position_embeddings
    assert "data.max_length=512" in cfg.model.recipe_overrides and cfg.model.recipe == "pretrain_tiny"
    print_summary({"config": cfg, "after": {"test/acc": 0.5, "test/loss": 1.0}})
    out = " ".join(capsys.readouterr().out.split())  # the caption wraps at the table's width
    assert "test/acc = greedy exact match on the generated test split (200 items per task" in out
