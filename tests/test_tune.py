"""kernels/tune.fastest with triton's timer replaced by known times: the fastest candidate wins, failing ones are
skipped, the first is kept when all fail, and each timed candidate is reported once."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
import triton.testing  # noqa: E402

from kernels.tune import fastest  # noqa: E402


def test_fastest_picks_minimum_and_skips_failures(monkeypatch):
    times = {"a": 3.0, "b": 1.5, "c": 2.0}

    def fake_bench(fn, warmup, rep, return_mode):
        return fn()

    def run(cand):
        if cand == "bad":
            raise RuntimeError("out of resources")
        return times[cand]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    seen = []
    assert fastest(["a", "bad", "b", "c"], run, log=lambda c, t: seen.append((c, t))) == "b"
    assert seen == [("a", 3.0), ("b", 1.5), ("c", 2.0)]
    assert fastest(["bad", "bad"], run) == "bad"
