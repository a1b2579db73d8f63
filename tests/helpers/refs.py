"""Independent references for a training run's reported numbers: a callback that recomputes, in float64 with
materialised logits and torch's cross-entropy, the loss of every training batch (with the weights as they are when the
batch starts) and of every test batch, and scores the test answers with a plain greedy loop (no KV cache, no batching
of the generation). `check_run(res, ref)` compares them with what `memfit.train.run` returned.

Tolerance: the run computes in float32 (the CCE/torch loss over a 2-layer model's logits); float32 forward passes of
these tiny models agree with float64 to ~1e-6 relative, so 1e-4 relative is far from both rounding and any real error
(a wrong mask, a missing shift or a wrong reduction changes the loss by > 1e-2).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

REL = 1e-4


def f64_loss(model: Any, batch: dict[str, Any]) -> float:
    """Mean next-token cross-entropy over the labelled positions, float64."""
    m = copy.deepcopy(model)
    for mod in m.modules():  # weights stored compressed (NF4, NeuZip): their decoded values, as dense float64
        for name, p in list(mod._parameters.items()):
            if p is not None and hasattr(p, "dequantize"):
                mod._parameters[name] = torch.nn.Parameter(p.dequantize().double(), requires_grad=False)
    m = m.double()
    with torch.no_grad():
        logits = m(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits
    labels = batch["labels"][:, 1:]
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100))


def greedy_answers(model: Any, tok: Any, batch: dict[str, Any]) -> list[str]:
    """First line of each prompt's greedy continuation, one prompt at a time, full forward pass per token."""
    out = []
    max_new = max(len(tok.encode(" " + t, add_special_tokens=False)) for t in batch["targets"]) + 2
    for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"]):
        seq = ids[mask.bool()].tolist()
        n0 = len(seq)
        for _ in range(max_new):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            seq.append(nxt)
        out.append(tok.decode(seq[n0:], skip_special_tokens=True).split("\n", 1)[0].strip())
    return out


class Reference(L.Callback):
    def __init__(self) -> None:
        self.train: dict[int, float] = {}  # global step after the batch -> loss
        self.test: list[tuple[float, int]] = []  # (loss, batch size) of the last test run
        self.correct = self.total = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.train[trainer.global_step + 1] = f64_loss(pl_module.model, batch)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.test, self.correct, self.total = [], 0, 0

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self.test.append((f64_loss(pl_module.model, batch), batch["input_ids"].shape[0]))
        if "prompt_ids" in batch:
            was = pl_module.model.training
            pl_module.model.eval()
            preds = greedy_answers(pl_module.model, pl_module.tokenizer, batch)
            pl_module.model.train(was)
            self.correct += sum(p == t.strip() for p, t in zip(preds, batch["targets"]))
            self.total += len(preds)

    @property
    def test_loss(self) -> float:
        return sum(loss * n for loss, n in self.test) / sum(n for _, n in self.test)


def check_run(res: dict[str, Any], ref: Reference, steps: int) -> None:
    """train_loss is the last step's loss; after-training test loss (batch-size weighted mean) and accuracy."""
    assert sorted(ref.train) == list(range(1, steps + 1)), sorted(ref.train)
    assert math.isclose(res["train_loss"], ref.train[steps], rel_tol=REL), (res["train_loss"], ref.train)
    after = res.get("after")
    if after is not None:
        assert math.isclose(after["test/loss"], ref.test_loss, rel_tol=REL), (after["test/loss"], ref.test_loss)
        if ref.total:
            assert after["test/acc"] == ref.correct / ref.total, (after["test/acc"], ref.correct, ref.total)
