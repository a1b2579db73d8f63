"""The app's composition matrix (adapter x storage x loss x callbacks) run through `memfit.train.run`, shared by the
CPU test (tests/test_app.py, CI) and the GPU test (tests/test_app_gpu.py, one device call).

Each case trains a tiny random Llama for 6 steps (validation and a checkpoint every 3), scores the test split before
and after (greedy generation included), saves the model, then resumes from the step-3 checkpoint and must repeat the
last three losses. Asserted: finite losses that fall, evaluation results (on CPU: losses and accuracy against float64
and plain greedy recomputations, tests/helpers/refs.py), the saved model's logits against the trained model's, and the
resumed losses against the uninterrupted run's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from refs import Reference, check_run

from conftest import TASK_FAST

COMPOSITIONS: dict[str, list[str]] = {
    "lora-dense-torch": ["adapter=lora", "storage=dense", "loss=torch"],
    "pissa-dense-cce": ["adapter=pissa", "storage=dense", "loss=cce"],
    "qpissa-nf4-cce": ["adapter=pissa", "storage=nf4", "loss=cce"],
    "loftq-nf4-cce": ["adapter=loftq", "storage=nf4", "loss=cce"],
    "lora-neuzip-cce": ["adapter=lora", "storage=neuzip", "storage.min_numel=0", "loss=cce"],
    "pissa-neuzip_lossy-cce": ["adapter=pissa", "storage=neuzip_lossy", "storage.min_numel=0", "loss=cce"],
    "full-neuzip_trained-cce": ["adapter=none", "storage=neuzip", "storage.min_numel=0", "storage.train_compressed=true",
                                "trainer.gradient_clip_val=null", "optim=sgd", "optim.lr=0.05"],
    "qpissa-nf4-cce-fmdelta": ["adapter=pissa", "storage=nf4", "loss=cce", "callbacks=fmdelta"],
    "full-dense-cce-fmdelta": ["adapter=none", "storage=dense", "loss=cce", "callbacks=fmdelta"],
}
# combinations refused at start, with the message they must give
REFUSED: dict[tuple[str, str], str] = {
    ("full-neuzip_trained-cce", "fsdp"): "storage.train_compressed=true is not supported with trainer=fsdp",
}
MODEL = ["model.pretrained=false", "model.arch.hidden_size=64", "model.arch.intermediate_size=128",
         "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=2"]


class Losses(L.Callback):
    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.by_step[trainer.global_step] = float(outputs["loss"])


def overrides(name: str, trainer: str, dtype: str, out: Path) -> list[str]:
    trainer_cfg = {"cpu": ["trainer=cpu"], "gpu": ["trainer=gpu"],
                   "fsdp": ["trainer=fsdp", "trainer.devices=1"] + (["trainer.accelerator=cpu"]
                                                                      if not torch.cuda.is_available() else [])}[trainer]
    return [*MODEL, *trainer_cfg, f"model.dtype={dtype}", "optim.lr=5e-3", *COMPOSITIONS[name], *TASK_FAST,
            "data.batch_size=8", "data.eval_batch_size=8", "data.n_val=4", "data.n_test=8", "logger=csv",
            "~callbacks.progress", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
            "callbacks.model_checkpoint.save_top_k=-1", "eval.before=true", "print_summary=false",
            f"save_model={out}/model", f"paths.output_dir={out}/run", f"paths.cache_dir={out}/cache"]


def run_case(name: str, trainer: str, dtype: str, tmp_path: Path, resume_tol: float) -> dict[str, Any]:
    """Train, evaluate, save, resume; assert each. Returns the first run's results."""
    from transformers import AutoModelForCausalLM

    from memfit.config import compose
    from memfit.train import run, validate

    cfg = compose("train", overrides(name, trainer, dtype, tmp_path))
    refused = REFUSED.get((name, trainer))
    if refused:
        with pytest.raises(ValueError, match=refused):
            validate(cfg)
        return {}
    rec, ref = Losses(), Reference()
    res = run(cfg, callbacks=[rec] + ([ref] if trainer == "cpu" else []))
    losses = [rec.by_step[s] for s in range(1, 7)]
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-2:]) < sum(losses[:2]), f"loss did not fall: {losses}"
    for when in ("before", "after"):
        assert math.isfinite(res[when]["test/loss"]), res[when]
        assert res[when]["test/acc"] * 8 == round(res[when]["test/acc"] * 8), res[when]  # k of data.n_test=8 right
    assert res["after"]["test/loss"] < res["before"]["test/loss"], (res["before"], res["after"])
    if trainer == "cpu":  # float32 on CPU: the losses and accuracy against float64 / plain greedy recomputations
        check_run(res, ref, steps=6)
        assert ref.total == 8
    assert set(res["perf"]) >= {"tokens_per_s", "peak_mem_gib"}  # their values: tests/test_first_hour.py

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    x = torch.randint(3, saved.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    module = res["module"]
    if getattr(module, "_fsdp_root", None) is None:  # compare with the trained model itself (not sharded)
        from memfit.adapters import merged_copy

        live = merged_copy(module.model).float().eval().cpu()
        with torch.no_grad():
            a, b = saved(x).logits, live(x).logits
        tol = 1e-4 if dtype == "float32" else 2e-2
        assert (a - b).abs().max() <= tol * b.abs().max(), float((a - b).abs().max())
    with torch.no_grad():
        assert torch.isfinite(saved(x).logits).all()

    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step000003*"))
    assert ckpt, sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    again = compose("train", [*overrides(name, trainer, dtype, tmp_path / "resumed"), f"ckpt_path={ckpt[0]}",
                              "eval.before=false", "eval.test=false", "save_model=null"])
    rec2 = Losses()
    run(again, callbacks=[rec2])
    assert sorted(rec2.by_step) == [4, 5, 6]
    for s in (4, 5, 6):
        a, b = rec2.by_step[s], rec.by_step[s]
        assert abs(a - b) <= resume_tol * max(1.0, abs(b)), (s, a, b)
    return res
