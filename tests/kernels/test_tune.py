"""kernels/tune with triton's timer replaced by known times: the fastest candidate wins, failing ones are skipped, the
first is kept when all fail, and each timed candidate is reported once; the disk cache of picks is reused across
processes, keyed so that another kernel source, problem or candidate list re-tunes, and survives corruption and
concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

pytest.importorskip("triton")
import triton.testing  # noqa: E402

from memfit.kernels.settings import SETTINGS
from memfit.kernels.tune import fastest  # noqa: E402


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


def _counting_run(times: dict, calls: list):
    def run(cand):
        calls.append(cand)
        if cand not in times:
            raise RuntimeError("out of resources")
        return times[cand]

    return run


@pytest.fixture
def bench(monkeypatch, tmp_path):
    """triton's timer replaced by the candidate's known time; the disk cache in a fresh temporary file."""
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, return_mode: fn())
    path = tmp_path / "cache" / "tune.json"
    monkeypatch.setattr(SETTINGS, "tune_cache", str(path))
    return path


def test_tuned_persists_pick_and_reuses_it_without_timing(bench):
    from memfit.kernels.tune import tuned

    calls: list = []
    run = _counting_run({(1, 2): 2.0, (3, 4): 1.0}, calls)
    kw = {"device": "cpu", "source_file": __file__}
    assert tuned("k", (8, "torch.bfloat16"), [(1, 2), (3, 4)], run, **kw) == (3, 4)
    assert calls == [(1, 2), (3, 4)]
    assert list(json.loads(bench.read_text()).values()) == ["(3, 4)"]
    calls.clear()  # as a new process would: nothing in memory, the file on disk
    assert tuned("k", (8, "torch.bfloat16"), [(1, 2), (3, 4)], run, **kw) == (3, 4)
    assert calls == []
    # another problem key, another kernel or a candidate list without the cached pick: timed again
    assert tuned("k", (16, "torch.bfloat16"), [(1, 2), (3, 4)], run, **kw) == (3, 4)
    assert tuned("other", (8, "torch.bfloat16"), [(1, 2), (3, 4)], run, **kw) == (3, 4)
    assert tuned("k", (8, "torch.bfloat16"), [(1, 2)], run, **kw) == (1, 2)
    assert calls == [(1, 2), (3, 4), (1, 2), (3, 4), (1, 2)]
    assert len(json.loads(bench.read_text())) == 3


def test_tuned_keys_on_kernel_source(bench, tmp_path):
    from memfit.kernels import tune

    src = tmp_path / "kernel_v1.py"
    src.write_text("v1")
    calls: list = []
    run = _counting_run({"a": 2.0, "b": 1.0}, calls)
    assert tune.tuned("k", (1,), ["a", "b"], run, device="cpu", source_file=str(src)) == "b"
    src2 = tmp_path / "kernel_v2.py"
    src2.write_text("v2")  # an edited kernel (another digest) must not reuse the old pick
    assert tune.tuned("k", (1,), ["a", "b"], run, device="cpu", source_file=str(src2)) == "b"
    assert calls == ["a", "b", "a", "b"]


def test_tuned_all_failed_is_not_cached_and_off_switch(bench, monkeypatch):
    from memfit.kernels.tune import tuned

    calls: list = []
    run = _counting_run({}, calls)
    assert tuned("k", (1,), ["x", "y"], run, device="cpu", source_file=__file__) == "x"
    assert not bench.exists() or json.loads(bench.read_text()) == {}
    monkeypatch.setattr(SETTINGS, "tune_cache", "0")
    ok = _counting_run({"x": 1.0}, calls)
    assert tuned("k", (1,), ["x"], ok, device="cpu", source_file=__file__) == "x"
    assert not bench.exists() or json.loads(bench.read_text()) == {}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"a": 3}'])
def test_tuned_corrupt_cache_warns_and_is_rewritten(bench, content):
    from memfit.kernels.tune import tuned

    bench.parent.mkdir(parents=True)
    bench.write_text(content)
    calls: list = []
    with pytest.warns(UserWarning, match="tuning cache"):
        assert tuned("k", (1,), ["a", "b"], _counting_run({"a": 1.0, "b": 2.0}, calls), device="cpu",
                     source_file=__file__) == "a"
    assert calls == ["a", "b"]
    assert list(json.loads(bench.read_text()).values()) == ["'a'"]


def test_tuned_unwritable_cache_warns_and_still_picks(bench, monkeypatch, tmp_path):
    from memfit.kernels.tune import tuned

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(SETTINGS, "tune_cache", str(blocker / "tune.json"))  # parent is a file: cannot be created
    with pytest.warns(UserWarning, match="could not be written"):
        assert tuned("k", (1,), ["a", "b"], _counting_run({"a": 2.0, "b": 1.0}, []), device="cpu",
                     source_file=__file__) == "b"


def _store_many(path: str, tag: str) -> None:
    import os

    os.environ["MEMFIT_TUNE_CACHE"] = path
    from memfit.kernels import tune

    for i in range(25):
        tune._store(Path(path), f"{tag}{i}", repr(i))


def test_concurrent_writers_keep_every_pick(tmp_path):
    """Ranks that start together each add their picks; the lock makes the read-modify-write lose none."""
    ctx = mp.get_context("spawn")
    path = str(tmp_path / "tune.json")
    procs = [ctx.Process(target=_store_many, args=(path, tag)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads(Path(path).read_text())
    assert sorted(data) == sorted(f"{t}{i}" for t in "ab" for i in range(25))


def test_nf4_autotune_pick_survives_a_new_process(bench):
    """The NF4 kernel's first-use pick goes through the disk cache: with the in-process table emptied (a new
    process), the same key returns the cached MMConfig without timing anything."""
    import torch

    from memfit.kernels.nf4 import matmul as nm

    cands = nm.candidate_configs(4096, 4096, False, 132, 1, 64)
    times = {c: 1.0 + i for i, c in enumerate(cands)}
    times[cands[-1]] = 0.5
    key = (False, 4096, 4096, 1, 64, False, torch.bfloat16, torch.device("cpu"))
    calls: list = []
    run = _counting_run(times, calls)
    nm._CONFIGS.pop(key, None)
    assert nm._autotune(key, run, cands) == cands[-1]
    assert len(calls) == len(cands)
    nm._CONFIGS.pop(key)
    assert nm._autotune(key, run, cands) == cands[-1]
    assert len(calls) == len(cands)
    nm._CONFIGS.pop(key)
