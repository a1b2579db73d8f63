"""How many CPU threads are worth starting here: the cores this process may run on, less those other processes keep
busy (1-minute load average, this process counted as one). On a busy machine an extra thread only adds waiting: a
parallel op ends when its last thread does, and a thread whose core is taken runs late (OpenMP's spinning threads
made a small matmul ~300x slower on 2 cores at load 7)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def idle_cores() -> int:
    """Cores not taken by other processes, at least 1."""
    cores = usable_cores()
    try:
        idle = cores - max(0.0, os.getloadavg()[0] - 1.0)
    except (AttributeError, OSError):
        idle = cores
    return max(1, min(cores, int(idle + 0.5)))
