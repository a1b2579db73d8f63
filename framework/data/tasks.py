"""Generated algorithmic reasoning tasks in the surface format of BIG-Bench-Hard.

Each generator draws one (input, target) pair from a `random.Random`, so a suite is deterministic by seed and can be
made as large as a run needs, with disjoint train/val/test splits. Answers are computed by construction; the tests
check them with independent solvers. The generators' defaults follow the real items' forms, lengths and vocabulary
(tasks_logic.py, tasks_text.py, tasks_navigate.py); their keyword options are the `data.difficulty.<task>` knobs.
"""

from __future__ import annotations

import inspect
import random
import zlib
from collections.abc import Callable

from memfit.data.tasks_logic import boolean_expressions, dyck_languages, multistep_arithmetic_two
from memfit.data.tasks_navigate import navigate
from memfit.data.tasks_text import object_counting, word_sorting

Example = tuple[str, str]

# bump when a generator's output changes: cached pre-trained bases are keyed on it
SUITE_VERSION = 3

TASKS: dict[str, Callable[..., Example]] = {
    "boolean_expressions": boolean_expressions,
    "multistep_arithmetic_two": multistep_arithmetic_two,
    "word_sorting": word_sorting,
    "dyck_languages": dyck_languages,
    "object_counting": object_counting,
    "navigate": navigate,
}

SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}


def resolve_tasks(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """`all`, one name or a list of names -> validated list; unknown names fail with the valid ones listed."""
    if isinstance(names, str):
        names = list(TASKS) if names == "all" else [names]
    names = list(names)
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {unknown or names}; valid tasks: {', '.join(TASKS)} (or 'all')")
    return names


def knobs(task: str) -> dict[str, object]:
    """The difficulty options of a task's generator with their defaults (the real items' ranges)."""
    params = list(inspect.signature(TASKS[task]).parameters.values())[1:]  # after the rng
    return {p.name: p.default for p in params}


def check_difficulty(task: str, difficulty: dict[str, object]) -> None:
    """Unknown options fail naming the field and the valid ones (instead of a TypeError deep in a generator)."""
    unknown = sorted(set(difficulty) - set(knobs(task)))
    if unknown:
        raise ValueError(f"data.difficulty.{task} has unknown option(s) {unknown}; valid: "
                         + ", ".join(f"{k} (default {v})" for k, v in knobs(task).items()))


def generate_split(task: str, split: str, n: int, seed: int = 0, **difficulty) -> list[dict[str, str]]:
    """`n` distinct examples of `task` for `split`; inputs never repeat across the splits of one seed.

    Splits are made by hashing inputs into buckets (train 80%, val 10%, test 10%) so the same input can never land in
    two splits, whatever sizes are asked for.
    """
    resolve_tasks(task)
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLIT_OFFSETS)}")
    check_difficulty(task, difficulty)
    rng = random.Random(f"{task}/{seed}/{split}")
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise RuntimeError(f"task {task} cannot produce {n} distinct {split} examples with {difficulty}")
        x, y = TASKS[task](rng, **difficulty)
        bucket = zlib.crc32(x.encode()) % 10
        owner = "train" if bucket < 8 else "val" if bucket == 8 else "test"
        if owner != split or x in seen:
            continue
        seen.add(x)
        out.append({"task": task, "input": x, "target": y})
    return out
