"""The discriminator (Trans-LoRA step 2): a model (the source + a LoRA by default) trained to answer "yes" for real
task inputs and "no" for synthetic ones, and its p(yes) vs p(no) verdicts.

The verdict compares p(" yes") with p(" no") at the first token where the two answers differ (their common prefix
scores the same under both): one token each with a word-level tokenizer, as in the paper; with a character-level one
" y" against " n". Summing every token of the answers instead would penalise the longer " yes" by its extra tokens and
make an unsure discriminator reject everything.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from memfit.transfer.generate import completion_logprobs

YES, NO = " yes", " no"


def task_label(task: str) -> str:
    return task.replace("_", " ")


def disc_prompt(x: str, task: str) -> str:
    """The paper's template: "<x>\\nIs the above question from <TASK> dataset?"."""
    return f"{x}\nIs the above question from {task_label(task)} dataset?"


def disc_rows(real: Sequence[str], synthetic: Sequence[str], task: str) -> list[dict[str, str]]:
    """Training rows: real inputs answered " yes", synthetic ones " no"."""
    rows = [{"prompt": disc_prompt(x, task), "completion": YES, "target": YES.strip(), "task": task} for x in real]
    rows += [{"prompt": disc_prompt(x, task), "completion": NO, "target": NO.strip(), "task": task} for x in synthetic]
    return rows


def split_heldout(real: Sequence[str], synthetic: Sequence[str], fraction: float, seed: int
                  ) -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
    """((real_train, syn_train), (real_heldout, syn_heldout)); each class split with the same fraction."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"discriminator.heldout={fraction!r} must be in (0, 1)")
    rng = random.Random(seed)
    out = []
    for xs in (list(real), list(synthetic)):
        xs = xs[:]
        rng.shuffle(xs)
        k = max(1, round(len(xs) * fraction))
        if len(xs) - k < 1:
            raise ValueError(f"{len(xs)} examples are too few to hold out {fraction:.0%} and still train")
        out.append((xs[k:], xs[:k]))
    (rt, rh), (st, sh) = out
    return (rt, st), (rh, sh)


def judge(model: Any, tok: Any, inputs: Sequence[str], task: str, batch_size: int = 32
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(" yes" | prompt), log p(" no" | prompt)) per input, float64."""
    prompts = [disc_prompt(x, task) for x in inputs]
    yes_part, no_part = deciding_answers(tok)
    yes = completion_logprobs(model, tok, prompts, [yes_part] * len(prompts), batch_size, desc="discriminate yes")
    no = completion_logprobs(model, tok, prompts, [no_part] * len(prompts), batch_size, desc="discriminate no")
    return yes, no


def deciding_answers(tok: Any) -> tuple[str, str]:
    """The answers cut after their first differing token under `tok` (" yes"/" no" whole for a tokenizer that has them
    as tokens; " y"/" n" for a character-level one)."""
    y, n = tok.encode(YES, add_special_tokens=False), tok.encode(NO, add_special_tokens=False)
    k = 0
    while k < min(len(y), len(n)) and y[k] == n[k]:
        k += 1
    return tok.decode(y[: k + 1]), tok.decode(n[: k + 1])


def accuracy(yes: torch.Tensor, no: torch.Tensor, is_real: torch.Tensor) -> float:
    """Share of inputs the discriminator labels right (real -> p(yes) > p(no), synthetic -> not)."""
    return float(((yes > no) == is_real.bool()).double().mean())
