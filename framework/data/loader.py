"""A data loader whose order is a pure function of (seed, epoch, rank) and that resumes mid-epoch.

Lightning restores model, optimizer and loop counters from a checkpoint but a plain DataLoader restarts its epoch from
the first batch, so a resumed run would see different data than an uninterrupted one. Here the permutation is
recomputed from (seed, epoch) and the batches already consumed are skipped, which gives identical losses after resume
(also after a SLURM requeue). Rank sharding is done here too, so Lightning's sampler replacement is not needed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochSampler(Sampler[int]):
    """Deterministic (seed, epoch) permutation, split across ranks, with a number of leading samples to skip."""

    def __init__(self, n: int, shuffle: bool, seed: int, batch_size: int, drop_last: bool):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.batch_size, self.drop_last = batch_size, drop_last
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        rank, world = _rank_world()
        per_rank = self.n // world if self.drop_last or world == 1 else -(-self.n // world)
        if world > 1 and not self.drop_last:  # pad by wrapping so every rank sees the same number of samples
            order = (order * (1 + per_rank * world // max(self.n, 1)))[: per_rank * world]
        return order[rank: per_rank * world: world]

    def num_batches(self) -> int:
        k = len(self._indices())
        return k // self.batch_size if self.drop_last else -(-k // self.batch_size)

    def __iter__(self) -> Iterator[int]:
        idx = self._indices()[self.skip_batches * self.batch_size:]
        self.skip_batches = 0
        return iter(idx)

    def __len__(self) -> int:
        return len(self._indices())


class ResumableLoader(DataLoader):
    """DataLoader over an `EpochSampler`. Lightning calls `sampler.set_epoch` before each epoch; `skip(k)` drops the
    first k batches of the next iteration (the batches a resumed run had already consumed)."""

    def __init__(self, dataset: Dataset, batch_size: int, collate_fn, shuffle: bool, seed: int,
                 drop_last: bool = False, num_workers: int = 0):
        sampler = EpochSampler(len(dataset), shuffle, seed, batch_size, drop_last)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=drop_last,
                         num_workers=num_workers)
        self.epoch_sampler = sampler

    def skip(self, batches: int) -> None:
        self.epoch_sampler.skip_batches = batches

    def identity(self) -> dict[str, int | bool]:
        """What fixes the batch order: a resume with other values would not continue the interrupted run's data."""
        s = self.epoch_sampler
        return {"n": s.n, "shuffle": s.shuffle, "seed": s.seed, "batch_size": s.batch_size, "drop_last": s.drop_last}

    def state_dict(self) -> dict[str, int | bool]:
        """Stored in Lightning checkpoints. The position itself is recomputed from Lightning's loop counters (the
        data module calls `skip`), so only the order's identity is kept, to detect a resume on different data."""
        return self.identity()

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        mine = self.identity()
        changed = {k: (state[k], mine[k]) for k in mine if k in state and state[k] != mine[k]}
        if changed:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            warnings.warn(f"resuming on different training data ({what}): the batches after the resume point are not "
                          "the ones the interrupted run would have seen", stacklevel=2)
