"""The first-party import graph, read from the code (`memfit` = framework/, `memfit.kernels` = kernels/): import
cycles among modules (module-level imports only, and again counting the imports inside functions), and how many
first-party imports sit inside functions. A maintainer's structure check that anyone can run:

    python experiments/import_graph.py            # prints cycles and counts; exit 1 if there is a module-level cycle
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"memfit": ROOT / "framework", "memfit.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def edges(known: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]], int]:
    """(module-level edges, all edges incl. function-level, count of function-level first-party imports)."""
    top: dict[str, set[str]] = defaultdict(set)
    every: dict[str, set[str]] = defaultdict(set)
    inner = 0
    for mod, path in known.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}".strip(".")
                subs = [f"{base}.{a.name}" for a in node.names]
                names = [n for n in subs if n in known] or [base]  # `from pkg import module` or `from mod import name`
            else:
                continue
            targets = {t for t in (_resolve(n, known) for n in names) if t and t != mod}
            if not targets:
                continue
            every[mod] |= targets
            if node.col_offset == 0:
                top[mod] |= targets
            else:
                inner += 1
    return top, every, inner


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def kernels_importing_framework(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith("memfit.kernels")
                  for t in ts if not t.startswith("memfit.kernels"))


def main() -> int:
    known = modules()
    top, every, inner = edges(known)
    top_cycles, all_cycles = cycles(top), cycles(every)
    print(f"{len(known)} modules; {sum(map(len, top.values()))} module-level first-party imports, {inner} inside "
          "functions")
    print(f"module-level cycles: {len(top_cycles)}")
    for c in top_cycles:
        print("  " + " <-> ".join(c))
    print(f"cycles counting imports inside functions: {len(all_cycles)}")
    for c in all_cycles:
        print("  " + " <-> ".join(c))
    bad = kernels_importing_framework(every)
    print(f"kernels importing the framework: {len(bad)}")
    for b in bad:
        print("  " + b)
    return 1 if top_cycles or bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
