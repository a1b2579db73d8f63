"""Tokenising prompt/completion pairs and collating them into training and generation batches."""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100
PROMPT_TEMPLATE = "Q: {input}\nA:"


def format_prompt(example_input: str, fewshot: list[dict[str, str]] | None = None) -> str:
    """BBH-style prompt; optional few-shot demonstrations precede the question."""
    shots = "".join(PROMPT_TEMPLATE.format(input=s["input"]) + f" {s['target']}\n\n" for s in fewshot or [])
    return shots + PROMPT_TEMPLATE.format(input=example_input)


def encode_pair(tok: Any, prompt: str, completion: str, max_length: int, completion_only: bool = True) -> dict:
    """Token ids of prompt + completion + eos, with labels masked to the completion when `completion_only`.

    Over-long examples lose tokens from the left of the prompt, never from the completion (a truncated answer would
    train the model on a wrong target); `prompt_cut` counts the tokens lost.
    """
    p = tok.encode(prompt, add_special_tokens=False)
    c = tok.encode(completion, add_special_tokens=False) + [tok.eos_token_id]
    if len(c) >= max_length:
        raise ValueError(f"completion of {len(c)} tokens does not fit data.max_length={max_length}")
    cut = max(0, len(p) + len(c) - max_length)
    p = p[cut:]
    labels = ([IGNORE_INDEX] * len(p) if completion_only else list(p)) + c
    return {"input_ids": p + c, "labels": labels, "prompt_ids": p, "prompt_cut": cut}


class Collator:
    """Right-padded (input_ids, attention_mask, labels) for the loss; left-padded prompts for batched generation."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            mask[i, :k] = 1
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if all(r.get("prompt_ids") for r in rows) and all("target" in r for r in rows):
            m = max(len(r["prompt_ids"]) for r in rows)
            pids = torch.full((len(rows), m), self.pad_id, dtype=torch.long)
            pmask = torch.zeros((len(rows), m), dtype=torch.long)
            for i, r in enumerate(rows):
                k = len(r["prompt_ids"])
                pids[i, m - k:] = torch.tensor(r["prompt_ids"])
                pmask[i, m - k:] = 1
            batch.update(prompt_ids=pids, prompt_mask=pmask, targets=[r["target"] for r in rows],
                         tasks=[r.get("task", "default") for r in rows])
        return batch
