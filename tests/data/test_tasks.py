"""The generated task suite: BBH surface format, determinism, split disjointness, answers checked by independent solvers,
and generator statistics against the real items' measured forms, lengths and vocabulary (issue 18)."""

from __future__ import annotations

import random
import re
import statistics
from collections import Counter

import pytest

from memfit.data.tasks import TASKS, generate_split, resolve_tasks

N = 150
N_STATS = 1000  # draws per task for the statistics tests


# ------------------------------------------------------------------------------------------------------ solvers
def solve_boolean(x: str) -> str:
    assert x.endswith(" is")
    expr = x[: -len(" is")]
    assert set(expr.split()) <= {"True", "False", "not", "and", "or", "(", ")"}
    return str(eval(expr))  # Python's own evaluator is the independent reference (same precedence as BBH)


ARITH_GROUP = r"-?\d( [-+*] -?\d){3}"


def solve_arithmetic(x: str) -> str:
    assert re.fullmatch(rf"\(\({ARITH_GROUP}\) [-+*] \({ARITH_GROUP}\)\) =", x), x
    return str(eval(x[: -len(" =")]))


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


COUNT_WORDS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
               "nine": 9, "ten": 10}
MEMBERS = {  # typed here independently of the generator's tables
    "musical instruments": "accordion cello clarinet drum flute guitar harp piano saxophone trombone trumpet violin",
    "fruits": "apple banana blackberry grape nectarine orange peach plum raspberry strawberry",
    "animals": "bear cat chicken cow dog donkey duck fish frog goat mouse pig rabbit snail snake",
    "vegetables": "broccoli cabbage carrot cauliflower celery lettuce onion potato yam",
    "objects": "bed car chair couch fridge lamp microwave oven stove table television toaster",
}
CATEGORY_OF = {noun: cat for cat, nouns in MEMBERS.items() for noun in nouns.split()}


def singular(word: str) -> str:
    irregular = {"mice": "mouse", "fish": "fish", "heads": "head", "stalks": "stalk"}
    if word in irregular:
        return irregular[word]
    for suffix, repl in (("ies", "y"), ("ches", "ch"), ("oes", "o"), ("s", "")):
        if word.endswith(suffix):
            return word[: -len(suffix)] + repl
    return word


def parse_counting(x: str) -> tuple[str, list[tuple[int, str]]]:
    """(asked category, [(count, noun)]) of an object_counting input."""
    m = re.fullmatch(r"I have (.*)\. How many (.*) do I have\?", x)
    assert m, x
    items = []
    for part in re.split(r", and |, | and ", m.group(1)):
        count_word, phrase = part.split(" ", 1)
        count = COUNT_WORDS[count_word]
        words = phrase.split()
        nouns = [w if count == 1 else singular(w) for w in words]
        found = [n for n in nouns if n in CATEGORY_OF]
        assert len(found) == 1, part
        if count == 1:
            assert count_word == ("an" if phrase[0] in "aeiou" else "a"), part
        items.append((count, found[0]))
    return m.group(2), items


def solve_counting(x: str) -> str:
    category, items = parse_counting(x)
    if category == "objects":  # "How many objects do I have?" counts every item
        assert all(CATEGORY_OF[n] == "objects" for _, n in items), x
    return str(sum(c for c, n in items if CATEGORY_OF[n] == category))


NAV_HEAD = "If you follow these instructions, do you return to the starting point?"


def parse_navigate(x: str) -> tuple[bool, list[str]]:
    """(template says "Always face forward.", instruction sentences)."""
    head, options = x.split("\n", 1)
    assert options == "Options:\n- Yes\n- No" and head.startswith(NAV_HEAD + " ")
    body = head[len(NAV_HEAD) + 1:]
    fixed = body.startswith("Always face forward. ")
    body = body.removeprefix("Always face forward. ")
    return fixed, re.findall(r"[^.]+\.", body)


def solve_navigate(x: str) -> str:
    fixed, sentences = parse_navigate(x)
    pos, facing = 0j, 1j  # complex plane: forward is +i, a left turn multiplies by i
    for s in (s.strip() for s in sentences):
        if m := re.fullmatch(r"Take (\d+) steps? (left|right|forward|backward)\.", s):
            assert fixed
            pos += int(m.group(1)) * {"left": -1, "right": 1, "forward": 1j, "backward": -1j}[m.group(2)]
        elif m := re.fullmatch(r"Take (\d+) steps?\.", s):
            assert not fixed
            pos += int(m.group(1)) * facing
        elif m := re.fullmatch(r"Turn (left|right|around)\.", s):
            assert not fixed
            facing *= {"left": 1j, "right": -1j, "around": -1}[m.group(1)]
        else:
            raise AssertionError(f"unknown instruction {s!r}")
        if m.groups()[0].isdigit():
            assert ("steps" in s) == (int(m.group(1)) != 1), s
    return "Yes" if pos == 0 else "No"


SOLVERS = {
    "boolean_expressions": solve_boolean,
    "multistep_arithmetic_two": solve_arithmetic,
    "word_sorting": solve_sorting,
    "dyck_languages": solve_dyck,
    "object_counting": solve_counting,
    "navigate": solve_navigate,
}


def draws(task: str, n: int = N_STATS, seed: int = 0, **knobs) -> list[tuple[str, str]]:
    """Raw generator draws (before split routing and de-duplication): the generator's own distribution."""
    rng = random.Random(seed)
    return [TASKS[task](rng, **knobs) for _ in range(n)]


def test_every_task_has_a_solver():
    assert set(SOLVERS) == set(TASKS)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_answers_match_independent_solver(task):
    for split in ("train", "test"):
        for e in generate_split(task, split, N, seed=3):
            assert SOLVERS[task](e["input"]) == e["target"], e
    for x, y in draws(task, 400, seed=11):
        assert SOLVERS[task](x) == y, (x, y)


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
    assert all(e["input"].startswith("Complete the rest of the sequence, making sure that the parentheses are closed "
                                     "properly. Input: ") for e in rows["dyck_languages"])
    assert all(e["input"].startswith(NAV_HEAD) and e["target"] in ("Yes", "No") for e in rows["navigate"])
    answers = [e["target"] for e in generate_split("navigate", "train", 200, seed=0)]
    assert 0.3 < answers.count("Yes") / len(answers) < 0.7  # balanced enough that guessing one answer is not enough


# ----------------------------------------------------------------------------- statistics against the specification
def test_arithmetic_groups_have_four_operands_and_real_answer_range():
    items = draws("multistep_arithmetic_two")
    for x, _ in items:
        groups = re.findall(r"\(([^()]+)\)", x)
        assert len(groups) == 2 and all(len(re.findall(r"(?<!\S)-?\d+", g)) == 4 for g in groups), x
        assert all(-9 <= int(v) <= 9 for v in re.findall(r"(?<!\S)-?\d+", x))
    answers = [abs(int(y)) for _, y in items]
    assert max(answers) <= 250992  # the real maximum
    assert max(answers) > 20_000 and statistics.median(answers) < 200  # long-tailed, like the real answers


def test_word_sorting_lengths_and_vocabulary():
    from memfit.data.tasks_text import english_words

    vocab = english_words()
    assert len(vocab) > 50_000 and "can't" in vocab and all(w == w.lower() and " " not in w for w in vocab[::500])
    lists = [x.split("List: ", 1)[1].split() for x, _ in draws("word_sorting")]
    lengths = [len(words) for words in lists]
    assert min(lengths) == 2 and max(lengths) == 20 and statistics.median(lengths) == 12
    assert all(len(set(words)) == len(words) for words in lists)
    used = {w for words in lists for w in words}
    assert len(used) > 8000  # thousands of distinct words, not a fixed short list
    assert any("'" in w for w in used)  # contractions such as "can't" occur
    assert {len(w) for w in used} >= set(range(3, 15))


def test_dyck_lengths():
    seqs = [x.split("Input: ", 1)[1].split() for x, _ in draws("dyck_languages")]
    lengths = [len(s) for s in seqs]
    assert min(lengths) == 2 and 95 <= max(lengths) <= 99 and 12 <= statistics.median(lengths) <= 14
    answers = [len(y.split()) for _, y in draws("dyck_languages")]
    assert min(answers) >= 1 and max(answers) <= 10  # always something to close, at most max_depth


def test_object_counting_question_types_items_and_answers():
    items = draws("object_counting")
    parsed = [parse_counting(x) for x, _ in items]
    kinds = Counter(cat for cat, _ in parsed)
    assert set(kinds) == set(MEMBERS)  # the four categories and "objects"
    assert 0.18 <= kinds["objects"] / len(items) <= 0.26  # 22% of the real items
    sizes = [len(listed) for _, listed in parsed]
    assert min(sizes) == 2 and max(sizes) == 12
    answers = [int(y) for _, y in items]
    assert min(answers) == 2 and max(answers) == 18
    counts = Counter(c for _, listed in parsed for c, _ in listed)
    assert counts[1] > counts[2] > 0 and counts[5] > 0  # mostly single items, some "two cabbages"
    assert {n for _, listed in parsed for _, n in listed} == set(CATEGORY_OF)  # the whole noun vocabulary occurs


def test_navigate_templates_and_instruction_counts():
    items = draws("navigate")
    parsed = [parse_navigate(x) for x, _ in items]
    fixed = [f for f, _ in parsed]
    assert 0.45 <= sum(fixed) / len(items) <= 0.55  # half without "Always face forward."
    lengths = [len(s) for _, s in parsed]
    assert min(lengths) == 1 and max(lengths) == 9
    free = " ".join(" ".join(s) for f, s in parsed if not f)
    assert all(t in free for t in ("Turn left.", "Turn right.", "Turn around."))
    assert re.search(r"Take \d+ steps\.", free) and not re.search(r"steps? (left|right|forward|backward)", free)
    assert 0.4 <= sum(y == "Yes" for _, y in items) / len(items) <= 0.6


def test_boolean_literals_brackets_and_nots():
    items = draws("boolean_expressions")
    literals = Counter(sum(w in ("True", "False") for w in x.split()) for x, _ in items)
    assert set(literals) == {1, 2, 3, 4}
    assert all("not" in x.split() for x, _ in items)
    brackets = [x.count("(") for x, _ in items]
    assert statistics.mean(brackets) < 1.0 and sum(b == 0 for b in brackets) > 0.4 * len(items)  # few brackets
    assert 0.4 <= sum(y == "True" for _, y in items) / len(items) <= 0.65


def test_real_length_items_fit_the_default_max_length():
    """With the tiny model's character tokenizer every generated item fits data.max_length and the model's
    positions, so nothing is cut at the real lengths."""
    from memfit.config import compose
    from memfit.data.collate import format_prompt

    cfg = compose("train", ["data.tasks=all"])
    longest = max(len(format_prompt(e["input"])) + len(" " + e["target"]) + 1  # + end of sequence
                  for t in TASKS for e in generate_split(t, "test", 200, seed=0))
    assert 300 < longest <= cfg.data.max_length <= cfg.model.arch.max_position_embeddings


def test_difficulty_knobs_and_unknown_knob():
    short = draws("word_sorting", 200, min_words=3, median_words=4, max_words=5)
    assert {len(x.split("List: ")[1].split()) for x, _ in short} == {3, 4, 5}
    easy = draws("navigate", 200, turn_share=0.0, max_instructions=3)
    assert all(f and len(s) <= 3 for f, s in (parse_navigate(x) for x, _ in easy))
    with pytest.raises(ValueError, match=r"data.difficulty.navigate has unknown option\(s\) \['max_steps'\]; "
                                         r"valid: min_instructions \(default 1\)"):
        generate_split("navigate", "train", 5, seed=0, max_steps=4)


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match="valid tasks: boolean_expressions"):
        resolve_tasks(["boolean_expressions", "sports_understanding"])
    assert resolve_tasks("all") == list(TASKS)
