"""Synthetic task inputs from a few seeds: the numbered-list prompt, parsing, dedupe and discriminator-filtered
rejection sampling (Trans-LoRA step 3).

A model continues "Here are 10 examples:\\n1. <s1>\\n...\\n5. <s5>\\n6." and the text up to the next numbered line
("\\n7.") is one candidate.
A candidate is kept when the discriminator says p(yes) > p(no); sampling continues until the requested number is kept
or the candidate budget is spent (then the run stops and reports the acceptance rate).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from memfit.transfer.generate import generate_texts

log = logging.getLogger(__name__)

LIST_HEADER = "Here are 10 examples:\n"
ITEM_END = re.compile(r"\n\d+\.")  # the start of the next numbered line


def list_prompt(seeds: Sequence[str]) -> str:
    """The few-shot numbered list, open at item len(seeds)+1."""
    return LIST_HEADER + "".join(f"{i}. {s}\n" for i, s in enumerate(seeds, 1)) + f"{len(seeds) + 1}."


def parse_item(continuation: str, k: int) -> str | None:
    """The generated item k+1: text before the next numbered line, stripped; None when the model never closed the
    item (the budget ran out mid-item) or produced an empty one. The paper cuts at "\\n<k+2>."; any "\\n<number>."
    ends the item here, since small bases often misnumber the next line while the item itself is fine."""
    m = ITEM_END.search(continuation)
    if m is None:
        return None
    item = continuation[:m.start()].strip()
    return item or None


def check_seeds(seeds: Sequence[str], k: int) -> None:
    if k < 1:
        raise ValueError(f"synthesize.k={k} must be >= 1 (seed examples per prompt)")
    if len(seeds) < k:
        raise ValueError(f"only {len(seeds)} seed example(s) available but synthesize.k={k} are asked per prompt: "
                         f"provide at least {k} seeds (seeds.n / seeds.file) or lower synthesize.k")


def sample_prompts(seeds: Sequence[str], k: int, n: int, rng: random.Random) -> list[str]:
    """`n` list prompts, each with k seeds drawn without replacement in random order (diversity across prompts)."""
    check_seeds(seeds, k)
    return [list_prompt(rng.sample(list(seeds), k)) for _ in range(n)]


def generate_candidates(model: Any, tok: Any, seeds: Sequence[str], k: int, n_prompts: int, rng: random.Random,
                        max_new_tokens: int, batch_size: int, temperature: float, top_p: float,
                        desc: str = "synthesize") -> list[str | None]:
    """One round of sampling: a parsed item (or None) per prompt."""
    prompts = sample_prompts(seeds, k, n_prompts, rng)
    texts = generate_texts(model, tok, prompts, max_new_tokens, batch_size, do_sample=True, temperature=temperature,
                           top_p=top_p, stop=ITEM_END, desc=desc)
    return [parse_item(t, k) for t in texts]


def keep_rule(logp_yes: torch.Tensor, logp_no: torch.Tensor) -> torch.Tensor:
    """Trans-LoRA's filter: keep a sample when the discriminator prefers "yes", p(yes) > p(no) (strictly)."""
    return logp_yes > logp_no


@dataclass
class SynthesisResult:
    """All unique valid candidates in generation order, with the discriminator's verdicts."""

    candidates: list[dict[str, Any]] = field(default_factory=list)
    generated: int = 0     # prompts sampled
    invalid: int = 0       # unterminated or empty items
    duplicates: int = 0    # repeats of a seed or of an earlier candidate

    @property
    def kept(self) -> list[str]:
        return [c["input"] for c in self.candidates if c["kept"]]

    @property
    def unfiltered(self) -> list[str]:
        return [c["input"] for c in self.candidates]

    @property
    def acceptance_rate(self) -> float:
        return len(self.kept) / max(1, len(self.candidates))

    def stats(self) -> dict[str, Any]:
        return {"generated": self.generated, "valid_unique": len(self.candidates), "invalid": self.invalid,
                "duplicates": self.duplicates, "kept": len(self.kept), "acceptance_rate": self.acceptance_rate}


def rejection_sample(generate_round: Callable[[int], list[str | None]],
                     judge: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None,
                     n: int, round_size: int, max_candidates: int, exclude: Sequence[str] = (),
                     allow_partial: bool = False) -> SynthesisResult:
    """Sample rounds until `n` candidates are kept (and `n` unfiltered ones exist) or `max_candidates` prompts are spent.

    `judge` returns (log p(yes), log p(no)) per candidate; None keeps everything (no filter). Duplicates of `exclude`
    (the seeds) and of earlier candidates are dropped. Raises with the acceptance rate when fewer than `n` are kept
    (or none at all with `allow_partial`).
    """
    if n < 1 or round_size < 1 or max_candidates < 1:
        raise ValueError(f"n={n}, round_size={round_size}, max_candidates={max_candidates} must all be >= 1")
    res = SynthesisResult()
    seen = set(exclude)
    while (len(res.kept) < n or len(res.candidates) < n) and res.generated < max_candidates:
        items = generate_round(min(round_size, max_candidates - res.generated))
        res.generated += len(items)
        fresh = []
        for it in items:
            if it is None:
                res.invalid += 1
            elif it in seen:
                res.duplicates += 1
            else:
                seen.add(it)
                fresh.append(it)
        if not fresh:
            continue
        if judge is None:
            yes, no = torch.zeros(len(fresh), dtype=torch.float64), torch.full((len(fresh),), -1.0, dtype=torch.float64)
        else:
            yes, no = judge(fresh)
        keep = keep_rule(yes, no)
        for x, y, m, kp in zip(fresh, yes.tolist(), no.tolist(), keep.tolist()):
            res.candidates.append({"input": x, "logp_yes": y, "logp_no": m, "kept": bool(kp)})
        log.info("synthesis: %d prompts, %d valid unique, %d kept (acceptance %.1f%%)", res.generated,
                 len(res.candidates), len(res.kept), 100 * res.acceptance_rate)
    kept = len(res.kept)
    if judge is None and kept < n and (kept == 0 or not allow_partial):
        raise RuntimeError(
            f"the generator closed only {kept} unique items in {res.generated} prompts (valid rate "
            f"{100 * kept / max(1, res.generated):.1f}%; {res.invalid} unterminated/empty, {res.duplicates} duplicates) "
            f"within a budget of {max_candidates} prompts, but {n} are needed: raise the budget or use a base that "
            "continues numbered lists (pre-train with data.list_docs > 0)")
    if kept < n and (kept == 0 or not allow_partial):
        raise RuntimeError(
            f"the discriminator kept {kept} of {len(res.candidates)} valid candidates (acceptance rate "
            f"{100 * res.acceptance_rate:.1f}%; {res.invalid} unterminated/empty, {res.duplicates} duplicates) within "
            f"synthesize.max_candidates={max_candidates} prompts, but {n} are needed: raise synthesize.max_candidates, "
            f"train a better discriminator, set synthesize.allow_partial=true, or synthesize.filter=false")
    if len(res.candidates) < n:
        log.warning("only %d unique valid candidates for the unfiltered set (asked %d)", len(res.candidates), n)
    return res
