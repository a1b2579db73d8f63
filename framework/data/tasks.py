"""Generated algorithmic reasoning tasks in the surface format of BIG-Bench-Hard.

Each generator draws one (input, target) pair from a `random.Random`, so a suite is deterministic by seed and can be
made as large as a run needs, with disjoint train/val/test splits. Answers are computed here by construction; the tests
check them with independent solvers.
"""

from __future__ import annotations

import random
from collections.abc import Callable

Example = tuple[str, str]

# bump when a generator's output changes: cached pre-trained bases are keyed on it
SUITE_VERSION = 2

BOOL_WORDS = ("True", "False")


# ---------------------------------------------------------------------------------------------------------- boolean
def _bool_expr(rng: random.Random, depth: int, top: bool = False) -> tuple[str, bool]:
    if depth == 0 or (not top and rng.random() < 0.3):
        v = rng.random() < 0.5
        return ("True" if v else "False"), v
    kind = rng.choice(("not", "and", "or", "paren"))
    if kind == "not":
        s, v = _bool_atom(rng, depth - 1)
        return f"not {s}", not v
    if kind == "paren":
        s, v = _bool_expr(rng, depth - 1)
        return f"( {s} )", v
    a, va = _bool_atom(rng, depth - 1)
    b, vb = _bool_atom(rng, depth - 1)
    return (f"{a} and {b}", va and vb) if kind == "and" else (f"{a} or {b}", va or vb)


def _bool_atom(rng: random.Random, depth: int) -> tuple[str, bool]:
    """An operand of and/or: a literal, a negation or a parenthesised expression (keeps precedence unambiguous)."""
    s, v = _bool_expr(rng, depth)
    if " and " in s or " or " in s:
        return f"( {s} )", v
    return s, v


def boolean_expressions(rng: random.Random, depth: int = 3) -> Example:
    s, v = _bool_expr(rng, depth, top=True)
    return f"{s} is", str(v)


# ------------------------------------------------------------------------------------------------------- arithmetic
def _arith_group(rng: random.Random, n_terms: int) -> tuple[str, int]:
    nums = [rng.randint(-9, 9) for _ in range(n_terms)]
    ops = [rng.choice("+-*") for _ in range(n_terms - 1)]
    text = str(nums[0])
    for op, n in zip(ops, nums[1:]):
        text += f" {op} {n}"
    # standard precedence: fold products first, then sums left to right
    terms: list[int] = [nums[0]]
    signs: list[str] = []
    for op, n in zip(ops, nums[1:]):
        if op == "*":
            terms[-1] *= n
        else:
            signs.append(op)
            terms.append(n)
    value = terms[0]
    for op, t in zip(signs, terms[1:]):
        value = value + t if op == "+" else value - t
    return text, value


def multistep_arithmetic_two(rng: random.Random, n_terms: int = 3) -> Example:
    a, va = _arith_group(rng, n_terms)
    b, vb = _arith_group(rng, n_terms)
    op = rng.choice("+-*")
    value = va + vb if op == "+" else va - vb if op == "-" else va * vb
    return f"(({a}) {op} ({b})) =", str(value)


# ---------------------------------------------------------------------------------------------------------- sorting
WORDS = (
    "apple bear cart dune eagle fig grape harp ink jade kite lamp moss nest oak pear quill rose sand tide urn vine wolf "
    "yarn zinc amber brick cloud drum ember frost glove hill iris jelly knot leaf mint noon opal plum quartz reed stone "
    "tulip umbra valve wheat yolk"
).split()


def word_sorting(rng: random.Random, min_words: int = 3, max_words: int = 5) -> Example:
    words = rng.sample(WORDS, rng.randint(min_words, max_words))
    return f"Sort the following words alphabetically: List: {' '.join(words)}", " ".join(sorted(words))


# ------------------------------------------------------------------------------------------------------------- dyck
DYCK_PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}
DYCK_PROMPT = "Complete the rest of the sequence, making sure that the parentheses are closed properly. Input:"


def dyck_languages(rng: random.Random, max_len: int = 8, max_open: int = 3) -> Example:
    seq: list[str] = []
    stack: list[str] = []
    length = rng.randint(2, max_len)
    while len(seq) < length or not stack:
        if stack and (len(stack) >= max_open or rng.random() < 0.4):
            if len(seq) >= length:
                break
            seq.append(DYCK_PAIRS[stack.pop()])
        else:
            o = rng.choice(tuple(DYCK_PAIRS))
            stack.append(o)
            seq.append(o)
    if not stack:  # always leave something open
        o = rng.choice(tuple(DYCK_PAIRS))
        stack.append(o)
        seq.append(o)
    closing = [DYCK_PAIRS[o] for o in reversed(stack)]
    return f"{DYCK_PROMPT} {' '.join(seq)}", " ".join(closing)


# ------------------------------------------------------------------------------------------------------- counting
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
OBJECTS = {
    "musical instruments": [("violin", "violins"), ("piano", "pianos"), ("flute", "flutes"), ("drum", "drums"),
                            ("trumpet", "trumpets")],
    "fruits": [("apple", "apples"), ("banana", "bananas"), ("peach", "peaches"), ("plum", "plums"),
               ("grape", "grapes")],
    "animals": [("cat", "cats"), ("dog", "dogs"), ("rabbit", "rabbits"), ("goat", "goats"), ("snake", "snakes")],
    "vegetables": [("carrot", "carrots"), ("onion", "onions"), ("potato", "potatoes"), ("cabbage", "cabbages"),
                   ("yam", "yams")],
}
FURNITURE = [("chair", "chairs"), ("lamp", "lamps"), ("table", "tables"), ("bed", "beds"), ("couch", "couches")]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_counting(rng: random.Random, max_items: int = 4, max_count: int = 3) -> Example:
    category = rng.choice(tuple(OBJECTS))
    pool = [(item, True) for item in OBJECTS[category]] + [(item, False) for item in FURNITURE]
    chosen = rng.sample(pool, rng.randint(2, max_items))
    if not any(counts for _, counts in chosen):  # always at least one object of the asked category
        chosen[0] = (rng.choice(OBJECTS[category]), True)
    parts, total = [], 0
    for (single, plural), counts in chosen:
        n = rng.randint(1, max_count)
        parts.append(f"{_article(single)} {single}" if n == 1 else f"{NUMBER_WORDS[n]} {plural}")
        total += n if counts else 0
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + f", and {parts[-1]}"
    return f"I have {listed}. How many {category} do I have?", str(total)


# ------------------------------------------------------------------------------------------------------- navigate
NAVIGATE_PROMPT = "If you follow these instructions, do you return to the starting point? Always face forward."
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "forward": (0, 1), "backward": (0, -1)}


def navigate(rng: random.Random, max_steps: int = 4, max_dist: int = 5) -> Example:
    n = rng.randint(2, max_steps)
    moves = [(rng.randint(1, max_dist), rng.choice(tuple(DIRECTIONS))) for _ in range(n)]
    if rng.random() < 0.5:  # balance the answers: make half the walks return home
        x = sum(DIRECTIONS[d][0] * k for k, d in moves)
        y = sum(DIRECTIONS[d][1] * k for k, d in moves)
        if x:
            moves.append((abs(x), "left" if x > 0 else "right"))
        if y:
            moves.append((abs(y), "backward" if y > 0 else "forward"))
    x = sum(DIRECTIONS[d][0] * k for k, d in moves)
    y = sum(DIRECTIONS[d][1] * k for k, d in moves)
    steps = " ".join(f"Take {k} step{'s' if k > 1 else ''} {d}." for k, d in moves)
    answer = "Yes" if x == 0 and y == 0 else "No"
    return f"{NAVIGATE_PROMPT} {steps}\nOptions:\n- Yes\n- No", answer


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


def generate_split(task: str, split: str, n: int, seed: int = 0, **difficulty) -> list[dict[str, str]]:
    """`n` distinct examples of `task` for `split`; inputs never repeat across the splits of one seed.

    Splits are made by hashing inputs into buckets (train 80%, val 10%, test 10%) so the same input can never land in
    two splits, whatever sizes are asked for.
    """
    resolve_tasks(task)
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLIT_OFFSETS)}")
    import zlib

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
