"""First-use tile selection shared by the kernels: time each candidate launch once, keep the fastest.

Plain Python (no Triton code), so kernel files loaded under the interpreter can import it too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

C = TypeVar("C")


def fastest(cands: Sequence[C], run: Callable[[C], object], *, warmup: int = 5, rep: int = 25,
            log: Callable[[C, float], None] | None = None) -> C:
    """The candidate whose `run(candidate)` has the lowest median CUDA time (triton's do_bench, L2 flushed per call);
    candidates that fail to compile or launch are skipped, and the first one is kept if all fail."""
    from triton.testing import do_bench

    best, best_t = cands[0], float("inf")
    for cand in cands:
        try:
            t = do_bench(lambda cand=cand: run(cand), warmup=warmup, rep=rep, return_mode="median")
        except Exception:  # noqa: BLE001 - e.g. a tile that needs more shared memory than this GPU has
            continue
        if log is not None:
            log(cand, t)
        if t < best_t:
            best, best_t = cand, t
    return best
