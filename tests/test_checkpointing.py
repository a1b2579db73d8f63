"""Activation checkpointing through the app (`model.activation_checkpointing`): the same per-step losses with it on
and off (recomputation repeats the same arithmetic), for adapters with NF4 storage and CCE; on a GPU, less peak memory
at 2048 tokens."""

from __future__ import annotations

import pytest
import torch
from app_matrix import MODEL, Losses

from memfit.models.checkpointing import AUTO_MIN_TOKENS, wanted


@pytest.mark.parametrize("setting,seq,expected", [(True, 10, True), (False, 10**6, False), ("auto", 2047, False),
                                                  ("auto", 2048, True), ("auto", None, False), (None, 4096, False)])
def test_auto_setting(setting, seq, expected):
    assert AUTO_MIN_TOKENS == 2048 and wanted(setting, seq) is expected


def test_unknown_setting_is_named():
    with pytest.raises(ValueError, match="model.activation_checkpointing='sometimes' is not a valid option"):
        wanted("sometimes", 10)


def _run(fast_cfg, on: bool, *extra: str):
    from memfit.models.checkpointing import is_enabled
    from memfit.train import run

    rec = Losses()
    cfg = fast_cfg(*MODEL, f"model.activation_checkpointing={str(on).lower()}", "adapter=pissa", "storage=nf4",
                   "loss=cce", "trainer.max_steps=4", "eval.test=false", *extra)
    res = run(cfg, callbacks=[rec])
    assert is_enabled(res["module"].model) is on
    return rec.by_step, res


def test_same_losses_with_and_without(fast_cfg):
    off, _ = _run(fast_cfg, False)
    on, _ = _run(fast_cfg, True)
    assert sorted(on) == [1, 2, 3, 4] and on == off


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_less_peak_memory_at_2048_tokens_on_gpu(fast_cfg):
    seq = ["trainer=gpu", "trainer.accelerator=gpu", "callbacks=default", "~callbacks.progress",
           "~callbacks.model_checkpoint", "~callbacks.lr_monitor", "data=random", "data.max_length=2048", "data.n_train=8", "data.batch_size=2",
           "model.arch.max_position_embeddings=2048", "data.vocab_size=null", "eval.before=false"]
    off, r_off = _run(fast_cfg, False, *seq)
    on, r_on = _run(fast_cfg, True, *seq)
    assert max(abs(on[s] - off[s]) for s in on) <= 1e-2 * max(abs(v) for v in off.values())
    assert r_on["perf"]["peak_mem_gib"] < 0.8 * r_off["perf"]["peak_mem_gib"], (r_on["perf"], r_off["perf"])
