"""Which modules get adapters, and with which rank/alpha (peft's matching rules, so exports mean the same thing).

A target `q_proj` matches a module named `q_proj` or ending in `.q_proj`; `all-linear` matches every Linear/Conv1D
except the output head. Pattern keys (rank_pattern / alpha_pattern) are regexes matched against the end of the module
name at a dot boundary, first match wins, exactly as peft's `get_pattern_key`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import nn

from memfit.adapters.layer import LowRankAdapter, is_conv1d

ALL_LINEAR = "all-linear"


def adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _name_matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets: Sequence[str] | str) -> list[str]:
    """Names of the Linear/Conv1D modules selected by `targets`; a target that matches nothing is an error."""
    if isinstance(targets, str):
        targets = [targets]
    targets = [str(t) for t in targets]
    if not targets:
        raise ValueError("adapter.targets is empty: name the modules to adapt (e.g. [q_proj, v_proj] or all-linear)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    candidates = [(n, m) for n, m in model.named_modules()
                  if adaptable(m) and m is not head and not isinstance(m, LowRankAdapter)
                  and ".base_layer" not in f".{n}"]
    chosen: list[str] = []
    for t in targets:
        hits = [n for n, _ in candidates] if t == ALL_LINEAR else [n for n, _ in candidates if _name_matches(n, t)]
        if not hits:
            names = sorted({n.rsplit(".", 1)[-1] for n, _ in candidates})
            raise ValueError(f"adapter.targets entry {t!r} matches no Linear/Conv1D module; "
                             f"available names: {', '.join(names) or '(none)'}")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def pattern_value(name: str, patterns: Mapping[str, float] | None, default: float) -> float:
    """Value of the first pattern key matching the end of `name` (peft semantics), else `default`."""
    for key, value in (patterns or {}).items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", name)
        except re.error as err:
            raise ValueError(f"adapter pattern key {key!r} is not a valid regex: {err}") from err
        if hit:
            return value
    return default


def unused_patterns(names: Sequence[str], patterns: Mapping[str, float] | None) -> list[str]:
    """Pattern keys that select none of the adapted modules (a typo would otherwise be silently ignored)."""
    return [k for k in (patterns or {}) if not any(re.match(rf"(.*\.)?({k})$", n) for n in names)]
