"""Generator of the navigate task in both of the real item templates.

Half of the real items say "Always face forward." and move in absolute directions ("Take 3 steps left."); the other
half turn ("Turn left.", "Turn right.", "Turn around.") and walk where they face ("Take 3 steps."). Both have 1-9
instructions. The answer comes from simulating the walk.
"""

from __future__ import annotations

import random
from typing import NamedTuple

NAVIGATE_PROMPT = "If you follow these instructions, do you return to the starting point?"
FACE_FORWARD = "Always face forward."
NAVIGATE_OPTIONS = "Options:\n- Yes\n- No"
# headings counter-clockwise from the start's "forward": a left turn adds 1, a right turn 3, "around" 2
HEADINGS = ((0, 1), (-1, 0), (0, -1), (1, 0))
ABSOLUTE = {"forward": 0, "left": 1, "backward": 2, "right": 3}
TURNS = {"left": 1, "around": 2, "right": 3}



class Instruction(NamedTuple):
    """"Turn left." is (turn="left"); "Take 3 steps left." is (steps=3, direction="left"); "Take 3 steps." has no
    direction (walk where one faces)."""

    turn: str | None = None
    steps: int = 0
    direction: str | None = None


def _walk(instructions: list[Instruction]) -> tuple[int, int, int]:
    """(x, y, heading) after the instructions, starting at the origin facing heading 0."""
    x = y = heading = 0
    for ins in instructions:
        if ins.turn:
            heading = (heading + TURNS[ins.turn]) % 4
        else:
            dx, dy = HEADINGS[ABSOLUTE[ins.direction] if ins.direction else heading]
            x, y = x + dx * ins.steps, y + dy * ins.steps
    return x, y, heading


def _random_instruction(rng: random.Random, turns: bool, max_dist: int, p_turn: float) -> Instruction:
    if turns and rng.random() < p_turn:
        return Instruction(turn=rng.choice(tuple(TURNS)))
    return Instruction(steps=rng.randint(1, max_dist), direction=None if turns else rng.choice(tuple(ABSOLUTE)))


def _way_home(rng: random.Random, state: tuple[int, int, int], turns: bool, max_dist: int) -> list[Instruction]:
    """Instructions that walk back to the origin, one axis after the other, in steps of at most `max_dist`."""
    x, y, heading = state
    legs = [(-x, 0), (0, -y)]
    rng.shuffle(legs)
    out: list[Instruction] = []
    for dx, dy in legs:
        dist = abs(dx) + abs(dy)
        if not dist:
            continue
        target = HEADINGS.index(((dx > 0) - (dx < 0), (dy > 0) - (dy < 0)))
        if turns and target != heading:
            out.append(Instruction(turn=next(s for s, q in TURNS.items() if (heading + q) % 4 == target)))
            heading = target
        direction = None if turns else next(d for d, h in ABSOLUTE.items() if h == target)
        out += [Instruction(steps=k, direction=direction) for k in [max_dist] * (dist // max_dist) + [dist % max_dist] if k]
    return out


def _render(instructions: list[Instruction]) -> str:
    parts = []
    for ins in instructions:
        if ins.turn:
            parts.append(f"Turn {ins.turn}.")
        else:
            steps = f"{ins.steps} step{'' if ins.steps == 1 else 's'}"
            parts.append(f"Take {steps} {ins.direction}." if ins.direction else f"Take {steps}.")
    return " ".join(parts)


def navigate(rng: random.Random, min_instructions: int = 1, max_instructions: int = 9, max_dist: int = 10,
             turn_share: float = 0.5, p_turn: float = 0.4, yes_share: float = 0.5) -> tuple[str, str]:
    """`If you follow these instructions, do you return to the starting point? Turn left. Take 5 steps. Turn around.
    Take 5 steps.\\nOptions:\\n- Yes\\n- No` -> Yes.

    `turn_share` of the items use the turning template (`p_turn`: share of its instructions that are turns), the rest
    "Always face forward."; `yes_share` of the walks end at the start (made so by appending the way home).
    """
    if not 1 <= min_instructions <= max_instructions or max_instructions < 2:
        raise ValueError(f"navigate needs 1 <= min_instructions <= max_instructions and max_instructions >= 2, got "
                         f"{min_instructions}, {max_instructions}")
    turns = rng.random() < turn_share
    want_home = rng.random() < yes_share
    while True:
        if want_home:
            prefix = [_random_instruction(rng, turns, max_dist, p_turn)
                      for _ in range(rng.randint(1, max_instructions - 1))]
            instructions = prefix + _way_home(rng, _walk(prefix), turns, max_dist)
        else:
            instructions = [_random_instruction(rng, turns, max_dist, p_turn)
                            for _ in range(rng.randint(min_instructions, max_instructions))]
        home = _walk(instructions)[:2] == (0, 0)
        if home == want_home and min_instructions <= len(instructions) <= max_instructions:
            break
    head = f"{NAVIGATE_PROMPT} {FACE_FORWARD}" if not turns else NAVIGATE_PROMPT
    return f"{head} {_render(instructions)}\n{NAVIGATE_OPTIONS}", "Yes" if home else "No"
