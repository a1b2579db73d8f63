"""Generators of the word tasks: word_sorting and object_counting.

word_sorting draws from an English dictionary shipped as a package (GCIDE through `english-words`), not a hand-typed
list, so its vocabulary has the breadth of the real task (about 105,000 distinct words, contractions such as `can't`
included). object_counting covers the five real question types, "How many objects do I have?" included.
"""

from __future__ import annotations

import functools
import random
import re

from memfit.data.tasks_common import length_with_median

# ---------------------------------------------------------------------------------------------------------- sorting
SORT_PROMPT = "Sort the following words alphabetically: List:"
WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")  # plain lower-case words and contractions (can't, o'er); no phrases


@functools.lru_cache(maxsize=1)
def english_words() -> tuple[str, ...]:
    """The dictionary's lower-case single words, sorted: the package returns a set, whose order varies by process."""
    from english_words import get_english_words_set

    return tuple(sorted(w for w in get_english_words_set(["gcide"], lower=True) if WORD_RE.fullmatch(w)))


def word_sorting(rng: random.Random, min_words: int = 2, median_words: int = 12, max_words: int = 20) -> tuple[str, str]:
    """`Sort the following words alphabetically: List: oven costume counterpart` -> `costume counterpart oven`.

    Real lists have 2-20 words, median 12. Words are distinct within a list; the order is Python's `sorted`.
    """
    if min_words < 1:
        raise ValueError(f"word_sorting needs min_words >= 1, got {min_words}")
    n = length_with_median(rng, min_words, median_words, max_words)
    words = rng.sample(english_words(), n)
    return f"{SORT_PROMPT} {' '.join(words)}", " ".join(sorted(words))


# ------------------------------------------------------------------------------------------------------- counting
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _nouns(spec: str) -> list[tuple[str, str]]:
    """"peach/peaches, plum" -> [(peach, peaches), (plum, plums)]: regular plurals add -s."""
    out = []
    for item in spec.split(", "):
        single, _, plural = item.partition("/")
        out.append((single, plural or single + "s"))
    return out


CATEGORIES = {
    "musical instruments": _nouns("accordion, cello, clarinet, drum, flute, guitar, harp, piano, saxophone, "
                                  "trombone, trumpet, violin"),
    "fruits": _nouns("apple, banana, blackberry/blackberries, grape, nectarine, orange, peach/peaches, plum, "
                     "raspberry/raspberries, strawberry/strawberries"),
    "animals": _nouns("bear, cat, chicken, cow, dog, donkey, duck, fish/fish, frog, goat, mouse/mice, pig, rabbit, "
                      "snail, snake"),
    "vegetables": _nouns("cabbage, carrot, cauliflower, head of broccoli/heads of broccoli, lettuce head, onion, "
                         "potato/potatoes, stalk of celery/stalks of celery, yam"),
}
HOUSEHOLD = _nouns("bed, car, chair, couch/couches, fridge, lamp, microwave, oven, stove, table, television, toaster")
OBJECTS_QUESTION = "objects"  # counts every item listed (all household objects)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(noun: tuple[str, str], count: int) -> str:
    return f"{_article(noun[0])} {noun[0]}" if count == 1 else f"{NUMBER_WORDS[count]} {noun[1]}"


def object_counting(rng: random.Random, min_items: int = 2, max_items: int = 12, max_count: int = 5,
                    p_single: float = 0.7, objects_share: float = 0.22, min_answer: int = 2,
                    max_answer: int = 18) -> tuple[str, str]:
    """`I have a flute, a piano, two stoves, and a violin. How many musical instruments do I have?` -> 3.

    Real items: 2-12 listed items, each "a"/"an" or a count word ("two cabbages"), answers 2-18, and five question
    types: four categories, whose lists mix in household objects that do not count, and "How many objects do I have?"
    (`objects_share` of the items, 22% in the real set), whose list is household objects only and all count.
    """
    if not 1 <= min_items <= max_items or not 1 <= max_count < len(NUMBER_WORDS):
        raise ValueError(f"object_counting needs 1 <= min_items <= max_items and 1 <= max_count <= 10, got "
                         f"{min_items}, {max_items}, {max_count}")
    while True:
        n = rng.randint(min_items, max_items)
        if rng.random() < objects_share:
            category, counted = OBJECTS_QUESTION, rng.sample(HOUSEHOLD, min(n, len(HOUSEHOLD)))
            others: list[tuple[str, str]] = []
        else:
            category = rng.choice(tuple(CATEGORIES))
            k = rng.randint(1, min(n, len(CATEGORIES[category])))
            counted = rng.sample(CATEGORIES[category], k)
            others = rng.sample(HOUSEHOLD, min(n - k, len(HOUSEHOLD)))
        items = [(noun, True) for noun in counted] + [(noun, False) for noun in others]
        rng.shuffle(items)
        counts = [1 if rng.random() < p_single else rng.randint(2, max_count) for _ in items]
        total = sum(c for c, (_, counts_toward) in zip(counts, items) if counts_toward)
        if min_answer <= total <= max_answer:
            break
    parts = [_phrase(noun, c) for c, (noun, _) in zip(counts, items)]
    listed = parts[0] if len(parts) == 1 else " and ".join(parts) if len(parts) == 2 else \
        ", ".join(parts[:-1]) + f", and {parts[-1]}"
    return f"I have {listed}. How many {category} do I have?", str(total)
