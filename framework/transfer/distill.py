"""Distillation onto the target (Trans-LoRA step 4): the teacher (source + source LoRA) answers the synthetic inputs,
and a LoRA on the target is trained with cross-entropy on those answers as text (sequence-level, so the two models may
use different tokenizers). When both use the same vocabulary, a token-level KL(teacher || student) term can be added.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from memfit.data.collate import IGNORE_INDEX, format_prompt
from memfit.module import LMModule, first_line
from memfit.transfer.generate import generate_texts


def teacher_rows(teacher: Any, tok: Any, inputs: Sequence[str], task: str, max_new_tokens: int, batch_size: int
                 ) -> list[dict[str, str]]:
    """Greedy teacher answers (first line) as prompt/completion rows; empty answers are dropped (nothing to learn)."""
    prompts = [format_prompt(x) for x in inputs]
    answers = [first_line(t) for t in generate_texts(teacher, tok, prompts, max_new_tokens, batch_size, stop="\n",
                                                     desc="teacher answers")]
    return [{"prompt": p, "completion": f" {a}", "target": a, "task": task, "input": x}
            for x, p, a in zip(inputs, prompts, answers) if a]


def same_vocabulary(tok_a: Any, tok_b: Any) -> bool:
    """Token-level distillation needs identical token ids for identical strings."""
    return tok_a.get_vocab() == tok_b.get_vocab()


def kl_on_labels(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over completion positions of KL(p_teacher || p_student) of the next-token distributions (shifted like
    the LM loss: logits at t predict labels at t+1)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    if not mask.any():
        return student_logits.sum() * 0.0
    s = F.log_softmax(student_logits[:, :-1][mask].float(), dim=-1)
    t = F.log_softmax(teacher_logits[:, :-1][mask].float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


class DistillModule(LMModule):
    """LMModule whose loss adds `kl_weight` x KL(teacher || student) on the completion tokens (same vocabulary)."""

    def __init__(self, model: Any, tokenizer: Any, teacher: Any, kl_weight: float, **kw: Any):
        super().__init__(model, tokenizer, **kw)
        if kl_weight < 0:
            raise ValueError(f"distill.kl_weight={kl_weight} must be >= 0")
        self.kl_weight = kl_weight
        self._teacher = [teacher.eval().requires_grad_(False)]  # a list: not a submodule, not in the checkpoint

    def lm_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        ce = super().lm_loss(batch)
        if self.kl_weight == 0:
            return ce
        teacher = self._teacher[0].to(self.device)
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        s_logits = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        kl = kl_on_labels(s_logits, t_logits, batch["labels"])
        self.log("train/kl", kl, on_step=True, on_epoch=False, batch_size=batch["input_ids"].shape[0])
        return ce + self.kl_weight * kl
