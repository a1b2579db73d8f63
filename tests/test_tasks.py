"""The generated task suite: BBH surface format, determinism, split disjointness, answers checked by independent solvers."""

from __future__ import annotations

import re

import pytest

from memfit.data.tasks import TASKS, generate_split, resolve_tasks

N = 150


def solve_boolean(x: str) -> str:
    assert x.endswith(" is")
    expr = x[: -len(" is")]
    assert set(expr.split()) <= {"True", "False", "not", "and", "or", "(", ")"}
    return str(eval(expr))  # Python's own evaluator is the independent reference (same precedence as BBH)


def solve_arithmetic(x: str) -> str:
    assert x.endswith(" =")
    expr = x[: -len(" =")]
    assert re.fullmatch(r"[0-9+\-*() ]+", expr)
    return str(eval(expr))


def solve_sorting(x: str) -> str:
    prefix = "Sort the following words alphabetically: List: "
    assert x.startswith(prefix)
    return " ".join(sorted(x[len(prefix):].split()))


def solve_dyck(x: str) -> str:
    seq = x.split("Input: ", 1)[1].split()
    close = {"(": ")", "[": "]", "{": "}", "<": ">"}
    stack = []
    for s in seq:
        if s in close:
            stack.append(s)
        else:
            assert stack and close[stack.pop()] == s, "prefix must be well nested"
    return " ".join(close[s] for s in reversed(stack))


WORD_NUMBERS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5}
CATEGORY_MEMBERS = {
    "musical instruments": {"violin", "piano", "flute", "drum", "trumpet"},
    "fruits": {"apple", "banana", "peach", "plum", "grape"},
    "animals": {"cat", "dog", "rabbit", "goat", "snake"},
    "vegetables": {"carrot", "onion", "potato", "cabbage", "yam"},
}


def solve_counting(x: str) -> str:
    m = re.fullmatch(r"I have (.*)\. How many (.*) do I have\?", x)
    assert m
    members = CATEGORY_MEMBERS[m.group(2)]
    total = 0
    for part in re.split(r", and |, ", m.group(1)):
        count, noun = part.split(" ", 1)
        singular = noun[:-2] if noun.endswith(("ches", "toes")) else noun[:-1] if noun.endswith("s") and \
            WORD_NUMBERS[count] > 1 else noun
        total += WORD_NUMBERS[count] if singular in members else 0
    return str(total)


def solve_navigate(x: str) -> str:
    head, options = x.split("\n", 1)
    assert options == "Options:\n- Yes\n- No"
    pos = [0, 0]
    for k, d in re.findall(r"Take (\d+) steps? (left|right|forward|backward)\.", head):
        axis, sign = {"left": (0, -1), "right": (0, 1), "forward": (1, 1), "backward": (1, -1)}[d]
        pos[axis] += sign * int(k)
    return "Yes" if pos == [0, 0] else "No"


SOLVERS = {
    "boolean_expressions": solve_boolean,
    "multistep_arithmetic_two": solve_arithmetic,
    "word_sorting": solve_sorting,
    "dyck_languages": solve_dyck,
    "object_counting": solve_counting,
    "navigate": solve_navigate,
}


def test_every_task_has_a_solver():
    assert set(SOLVERS) == set(TASKS)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_answers_match_independent_solver(task):
    for split in ("train", "test"):
        for e in generate_split(task, split, N, seed=3):
            assert SOLVERS[task](e["input"]) == e["target"], e


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_and_disjoint_splits(task):
    a = generate_split(task, "train", N, seed=5)
    assert a == generate_split(task, "train", N, seed=5)
    assert a != generate_split(task, "train", N, seed=6)
    inputs = {s: {e["input"] for e in generate_split(task, s, 60, seed=5)} for s in ("train", "val", "test")}
    assert len(inputs["train"]) == 60
    assert not inputs["train"] & inputs["val"] and not inputs["train"] & inputs["test"] and not inputs["val"] & inputs["test"]


def test_surface_formats_follow_bbh():
    rows = {t: generate_split(t, "train", 20, seed=0) for t in TASKS}
    assert all(e["target"] in ("True", "False") for e in rows["boolean_expressions"])
    assert all(re.fullmatch(r"\(\(.*\) [-+*] \(.*\)\) =", e["input"]) for e in rows["multistep_arithmetic_two"])
    assert all(e["input"].startswith("Complete the rest of the sequence, making sure that the parentheses are closed "
                                     "properly. Input: ") for e in rows["dyck_languages"])
    assert all(e["input"].startswith("If you follow these instructions, do you return to the starting point?")
               and e["target"] in ("Yes", "No") for e in rows["navigate"])
    answers = [e["target"] for e in generate_split("navigate", "train", 200, seed=0)]
    assert 0.3 < answers.count("Yes") / len(answers) < 0.7  # balanced enough that guessing one answer is not enough


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match="valid tasks: boolean_expressions"):
        resolve_tasks(["boolean_expressions", "sports_understanding"])
    assert resolve_tasks("all") == list(TASKS)
