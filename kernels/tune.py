"""First-use tile selection shared by the kernels: time each candidate launch once, keep the fastest.

`tuned` also remembers the pick on disk, so a Hydra sweep of 20 runs (or the 8 ranks of one run, on later starts) does
not repeat tens of seconds of timing per process. An entry is keyed by the kernel, the problem key, the device name,
the torch/triton versions and a digest of the kernel's source file, so an upgrade or an edited kernel re-tunes. The file
is `$MEMFIT_TUNE_CACHE` (`0` or empty: off), else `$XDG_CACHE_HOME/memfit/tune.json` (`~/.cache/...`). A cache that
cannot be read or written only costs the timing again, with a warning: it never stops a run.

Plain Python (no Triton code), so kernel files loaded under the interpreter can import it too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from memfit.kernels.settings import SETTINGS

C = TypeVar("C")
FORMAT = 1  # bump when the entry layout changes: older files are then ignored


def _time_all(cands: Sequence[C], run: Callable[[C], object], warmup: int, rep: int,
              log: Callable[[C, float], None] | None) -> tuple[C, float]:
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
    return best, best_t


def fastest(cands: Sequence[C], run: Callable[[C], object], *, warmup: int = 5, rep: int = 25,
            log: Callable[[C, float], None] | None = None) -> C:
    """The candidate whose `run(candidate)` has the lowest median CUDA time (triton's do_bench, L2 flushed per call);
    candidates that fail to compile or launch are skipped, and the first one is kept if all fail."""
    return _time_all(cands, run, warmup, rep, log)[0]


def cache_path() -> Path | None:
    """Where picks persist, or None when the disk cache is switched off."""
    chosen = SETTINGS.tune_cache
    if chosen is not None:
        return None if chosen in ("", "0") else Path(chosen)
    return Path(SETTINGS.cache_dir) / "tune.json"


@functools.cache
def _digest(source_file: str) -> str:
    return hashlib.sha256(Path(source_file).read_bytes()).hexdigest()[:16]


def _device_name(device: object) -> str:
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _entry(kernel: str, key: Sequence[object], device: object, source_file: str) -> str:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return json.dumps([FORMAT, kernel, _device_name(device), torch.__version__, triton_version, _digest(source_file),
                       [str(x) for x in key]])


def _read(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        warnings.warn(f"kernel tuning cache {path} is unreadable ({err}); timing again and rewriting it",
                      stacklevel=3)
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        warnings.warn(f"kernel tuning cache {path} does not hold a JSON object of picks; timing again and "
                      "rewriting it", stacklevel=3)
        return {}
    return data


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the cache file, so that ranks starting together merge their picks instead of losing
    some to a lost update."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _store(path: Path, entry: str, value: str) -> None:
    try:
        with _locked(path):
            data = _read(path)
            data[entry] = value
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=0, sort_keys=True)
            os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except OSError as err:
        warnings.warn(f"kernel tuning cache {path} could not be written ({err}); picks last for this process only",
                      stacklevel=3)


def tuned(kernel: str, key: Sequence[object], cands: Sequence[C], run: Callable[[C], object], *, device: object,
          source_file: str, warmup: int = 5, rep: int = 25, log: Callable[[C, float], None] | None = None) -> C:
    """`fastest`, with the pick read from / written to the disk cache. A cached pick is used only if it is still one
    of `cands` (compared by repr); a timing in which every candidate failed is not cached."""
    path = cache_path()
    entry = _entry(kernel, key, device, source_file) if path is not None else ""
    if path is not None:
        hit = _read(path).get(entry)
        for cand in cands:
            if repr(cand) == hit:
                return cand
    best, best_t = _time_all(cands, run, warmup, rep, log)
    if path is not None and best_t != float("inf"):
        _store(path, entry, repr(best))
    return best
