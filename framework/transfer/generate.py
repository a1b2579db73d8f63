"""Batched text generation and completion scoring for any HF causal LM + tokenizer, with progress bars.

Prompts are encoded without special tokens (as the framework trains), left-padded, sorted by length so a batch wastes
little padding, and returned in the caller's order. A stop string ends a row early (the numbered-list prompt stops at
"\\n7."), so a batch finishes as soon as every row has produced its item.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList


class StopOnString(StoppingCriteria):
    """Per-row stop once the generated tail (after the prompt) contains `stop` (a string or a compiled regex)."""

    def __init__(self, tok: Any, stop: str | re.Pattern, prompt_len: int, window: int = 16):
        self.tok, self.prompt_len, self.window = tok, prompt_len, window
        self.pattern = stop if isinstance(stop, re.Pattern) else re.compile(re.escape(stop))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
        tails = self.tok.batch_decode(input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window):])
        return torch.tensor([self.pattern.search(t) is not None for t in tails], dtype=torch.bool,
                            device=input_ids.device)


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, n - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_texts(model: Any, tok: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, stop: str | re.Pattern | None = None,
                   desc: str = "generate") -> list[str]:
    """Decoded continuations of `prompts`, in order. A row ends once it contains `stop` (the text is returned
    uncut, so callers tell complete items from truncated ones by whether `stop` occurs)."""
    if not prompts:
        return []
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be >= 1")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [tok.encode(p, add_special_tokens=False) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start:start + batch_size]
        ids, mask = _left_pad([encoded[i] for i in idx], pad, device)
        kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad,
                                  eos_token_id=tok.eos_token_id)
        if do_sample:
            kw.update(temperature=temperature, top_p=top_p, top_k=0)
        if stop:
            kw["stopping_criteria"] = StoppingCriteriaList([StopOnString(tok, stop, ids.shape[1])])
        gen = model.generate(input_ids=ids, attention_mask=mask, **kw)
        texts = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
        for i, t in zip(idx, texts):
            out[i] = t
    model.train(was_training)
    return out


@torch.no_grad()
def completion_logprobs(model: Any, tok: Any, prompts: Sequence[str], completions: Sequence[str],
                        batch_size: int = 32, desc: str = "score") -> torch.Tensor:
    """log p(completion | prompt) summed over the completion's tokens, float64, one per pair (tokenizer-agnostic:
    compares whole answers, not first tokens, so a char-level " yes" and " no" are told apart)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    result = torch.empty(len(prompts), dtype=torch.float64)
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
        rows, spans = [], []
        for p, c in zip(prompts[start:start + batch_size], completions[start:start + batch_size]):
            pi, ci = tok.encode(p, add_special_tokens=False), tok.encode(c, add_special_tokens=False)
            if not ci or not pi:
                raise ValueError(f"prompt {p[:40]!r} and completion {c!r} must both encode to at least one token")
            rows.append(pi + ci)
            spans.append((len(pi), len(pi) + len(ci)))
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.double()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        for i, (a, b) in enumerate(spans):
            targets = ids[i, a:b]
            result[start + i] = logp[i, a - 1:b - 1].gather(-1, targets[:, None]).sum()
    model.train(was_training)
    return result
