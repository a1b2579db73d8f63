"""Fixed-length random token sequences: what memory and throughput benchmarks train on.

Every batch has exactly `max_length` tokens per row (no padding), so tokens/s and peak memory measure the model at
that sequence length and nothing else; the ids are a pure function of (seed, split, index), so a peer script that
calls `token_rows` with the same arguments trains on the very same batches.
"""

from __future__ import annotations

import torch
from datasets import Dataset

from memfit.data.datamodule import LMDataModule


def token_rows(n: int, length: int, vocab: int, seed: int, low: int = 3) -> torch.Tensor:
    """(n, length) int64 ids uniform in [low, vocab) (ids below `low` are left to special tokens)."""
    if vocab <= low:
        raise ValueError(f"vocabulary of {vocab} ids leaves none above the {low} special ids")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (n, length), generator=g)


class RandomTokenData(LMDataModule):
    """`data=random`: n_train (and n_val) rows of `max_length` random ids; `vocab_size` null = the tokenizer's size
    (a model's vocabulary may be larger than its tokenizer's: set it to the model's for realistic softmax widths)."""

    def __init__(self, n_train: int = 64, n_val: int = 0, vocab_size: int | None = None, **kw):
        super().__init__(**kw)
        self.n_train, self.n_val, self.vocab_size = n_train, n_val, vocab_size

    def build_splits(self) -> dict[str, Dataset]:
        vocab = int(self.vocab_size or len(self.tokenizer))
        splits = {}
        for i, (split, n) in enumerate((("train", self.n_train), ("val", self.n_val))):
            if n > 0:
                ids = token_rows(n, self.max_length, vocab, self.seed * 1000 + i).tolist()
                splits[split] = Dataset.from_list([{"input_ids": r, "labels": r} for r in ids])
        return splits

    def val_dataloader(self) -> list:
        """No validation rows (the benchmark default): an empty list, which Lightning treats as no validation."""
        self.setup()
        return super().val_dataloader() if "val" in self.splits else []
