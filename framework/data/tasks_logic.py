"""Generators of the symbolic tasks: boolean_expressions, multistep_arithmetic_two, dyck_languages.

Each draws one (input, target) pair from a `random.Random`; the answer is computed here by construction (the tests
check it with Python's own parser and a stack). Keyword options are the `data.difficulty.<task>` knobs; their
defaults reproduce the forms and lengths of the real BIG-Bench-Hard items (see the module docstrings of each task).
"""

from __future__ import annotations

import random

from memfit.data.tasks_common import length_with_median

# ---------------------------------------------------------------------------------------------------------- boolean
BOOL_WORDS = ("True", "False")
MAX_NOTS = 3  # `not` in a row before one operand


def _bool_operand(rng: random.Random, literals: int, p_not: float, p_paren: float) -> tuple[str, bool]:
    """`literals` literals as one operand: a literal or a bracketed chain, behind zero or more `not`s."""
    if literals > 1 or rng.random() < p_paren:
        inner, value = _bool_chain(rng, literals, p_not, p_paren)
        text = f"( {inner} )"
    else:
        value = rng.random() < 0.5
        text = str(value)
    for _ in range(MAX_NOTS):
        if rng.random() >= p_not:
            break
        text, value = f"not {text}", not value
    return text, value


def _bool_chain(rng: random.Random, literals: int, p_not: float, p_paren: float) -> tuple[str, bool]:
    """`literals` literals as operands joined by and/or; most operands are single literals (few brackets)."""
    sizes = []
    left = literals
    while left:
        size = 1 if left == 1 or rng.random() >= p_paren else rng.randint(2, left)
        sizes.append(size)
        left -= size
    ops = [rng.choice(("and", "or")) for _ in sizes[1:]]
    operands = [_bool_operand(rng, k, p_not, p_paren) for k in sizes]
    text = operands[0][0] + "".join(f" {op} {s}" for op, (s, _) in zip(ops, operands[1:]))
    # `and` binds tighter than `or`: the value is the `or` of the runs of operands joined by `and`
    runs = [[operands[0][1]]]
    for op, (_, v) in zip(ops, operands[1:]):
        if op == "and":
            runs[-1].append(v)
        else:
            runs.append([v])
    return text, any(all(run) for run in runs)


def boolean_expressions(rng: random.Random, min_literals: int = 1, max_literals: int = 4, p_not: float = 0.3,
                        p_paren: float = 0.12, min_nots: int = 1) -> tuple[str, str]:
    """`not ( True ) and ( True ) is` -> False. Real items: 1-4 literals, few brackets, at least one `not`.

    `p_not`: chance of each further `not` before an operand; `p_paren`: chance that an operand is bracketed (a single
    literal as `( True )`, or a run of literals); items with fewer than `min_nots` are redrawn.
    """
    if not 1 <= min_literals <= max_literals:
        raise ValueError(f"boolean_expressions needs 1 <= min_literals <= max_literals, got {min_literals}, "
                         f"{max_literals}")
    while True:
        text, value = _bool_chain(rng, rng.randint(min_literals, max_literals), p_not, p_paren)
        if text.split().count("not") >= min_nots:
            return f"{text} is", str(value)


# ------------------------------------------------------------------------------------------------------- arithmetic
def _arith_group(rng: random.Random, n_terms: int, lo: int, hi: int) -> tuple[str, int]:
    """`-1 + 2 + 9 * 5`: operands in [lo, hi], operators +-*, valued with the usual precedence."""
    nums = [rng.randint(lo, hi) for _ in range(n_terms)]
    ops = [rng.choice("+-*") for _ in range(n_terms - 1)]
    text = str(nums[0]) + "".join(f" {op} {n}" for op, n in zip(ops, nums[1:]))
    # products first, then the sums left to right
    terms, signs = [nums[0]], []
    for op, n in zip(ops, nums[1:]):
        if op == "*":
            terms[-1] *= n
        else:
            signs.append(1 if op == "+" else -1)
            terms.append(n)
    return text, terms[0] + sum(s * t for s, t in zip(signs, terms[1:]))


def multistep_arithmetic_two(rng: random.Random, n_terms: int = 4, min_operand: int = -9, max_operand: int = 9,
                             max_abs: int = 250992) -> tuple[str, str]:
    """`((-1 + 2 + 9 * 5) - (-2 + -4 + -4 * -7)) =` -> 30. Real items: two groups of 4 one-digit operands, answers up
    to |250992| (`max_abs`: larger draws, about 1 in 1000, are redrawn)."""
    while True:
        a, va = _arith_group(rng, n_terms, min_operand, max_operand)
        b, vb = _arith_group(rng, n_terms, min_operand, max_operand)
        op = rng.choice("+-*")
        value = va + vb if op == "+" else va - vb if op == "-" else va * vb
        if abs(value) <= max_abs:
            return f"(({a}) {op} ({b})) =", str(value)


# ------------------------------------------------------------------------------------------------------------- dyck
DYCK_PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}
DYCK_PROMPT = "Complete the rest of the sequence, making sure that the parentheses are closed properly. Input:"


def dyck_languages(rng: random.Random, min_len: int = 2, median_len: int = 13, max_len: int = 99,
                   max_depth: int = 10, p_open: float = 0.5) -> tuple[str, str]:
    """`... Input: [ { [` -> `] } ]`. Real inputs have 2-99 symbols, median 13 (long-tailed: lengths are drawn
    log-uniformly on each side of the median). The sequence is a random walk over the nesting depth (at most
    `max_depth` open) that always leaves something to close."""
    if min_len < 2:
        raise ValueError(f"dyck_languages needs min_len >= 2 (one symbol to keep, one to close), got {min_len}")
    length = length_with_median(rng, min_len, median_len, max_len, log=True)
    seq: list[str] = []
    stack: list[str] = []
    for i in range(length):
        last = i == length - 1
        must_open = not stack or (last and len(stack) == 1)  # never end balanced
        if must_open or (len(stack) < max_depth and rng.random() < p_open):
            stack.append(rng.choice(tuple(DYCK_PAIRS)))
            seq.append(stack[-1])
        else:
            seq.append(DYCK_PAIRS[stack.pop()])
    return f"{DYCK_PROMPT} {' '.join(seq)}", " ".join(DYCK_PAIRS[o] for o in reversed(stack))
