"""Mutation testing of the codecs, NF4, the CCE reference and dispatch, the adapter inits and the FM-Delta callback.

A small AST-based mutation runner (mutmut 3 copies the tree into mutants/ and rewrites imports by source path, which
does not fit the framework/ -> memfit, kernels/ -> memfit.kernels mapping). For each module (a set of source files and
the fast test selection that exercises them) it:

1. enumerates the mutation sites of every file: arithmetic/bitwise operator swaps (+ -, * /, // /, % //, << >>, & |,
   ^ &, ** *), comparison swaps (< <=, > >=, == !=, is / is not, in / not in), and/or, dropping `not` and unary
   minus, integer constants n -> n + 1, float constants x -> x + 1, True <-> False. Docstrings, strings, f-strings
   (error messages), annotations, and Triton kernels (@triton.jit) with the functions that launch them (`kernel[grid](...)`) (GPU code,
   tested on the GPU machine) are not mutated;
2. takes a seeded random sample of at most --max-mutants of them (the report says when it sampled);
3. applies one mutant at a time to a temporary copy of the tree (the mutated file is ast.unparse'd; the unmutated,
   unparsed tree is run first as a null mutant and must pass: it also gives the clean time for the timeout), and runs
   the module's test selection with `-x -q -p no:randomly -p no:cacheprovider` in a forked child of a process that has
   already imported torch/pytest (saves the interpreter start per mutant). A failing run kills the mutant; a run past
   --timeout (or a multiple of the clean time) is counted as killed and reported as a timeout.

    python experiments/mutation.py --phase before [--modules rans nf4] [--max-mutants 40] [--seed 0]
    python experiments/mutation.py --phase after --only-survivors   # re-test the before-run's survivors

The campaign (modules, their test selections, the survivors judged equivalent): experiments/mutation_campaign.py.
Results: experiments/results/mutation.json (both phases) and experiments/results/mutation.md (tables + survivors).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutation_campaign import EQUIVALENT, HOLDOUT_NOTES, MODULES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
PYTEST_FLAGS = ["-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-W", "ignore"]

BINOP_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
              ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
              ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitAnd, ast.MatMult: ast.Mult}
CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
            ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
SYM = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**",
       ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.MatMult: "@",
       ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is",
       ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in", ast.And: "and", ast.Or: "or"}


def _skipped(tree: ast.AST) -> set[int]:
    """ids of nodes never mutated: docstrings, f-strings, annotations, imports, Triton kernels and launchers."""
    skip: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr | ast.ImportFrom | ast.Import):
            mark(node)
        elif isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        elif isinstance(node, ast.arg):
            mark(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            mark(node.returns)
        launches = any(isinstance(c, ast.Call) and isinstance(c.func, ast.Subscript) for c in ast.walk(node))
        if isinstance(node, ast.FunctionDef) and (launches or any("jit" in ast.unparse(d) for d in node.decorator_list)):
            mark(node)  # Triton kernel bodies and their launchers: GPU code, out of this CPU campaign's scope
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                mark(first)
    return skip


def sites(tree: ast.AST) -> list[tuple[ast.AST, int, str, callable]]:
    """(node, line, description, apply) for every mutation of a parsed module, in a deterministic order."""
    skip = _skipped(tree)
    out = []
    parents = {id(c): p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}

    def replace(node: ast.AST, new: ast.AST):
        def apply():
            parent = parents[id(node)]
            for fname, value in ast.iter_fields(parent):
                if value is node:
                    setattr(parent, fname, new)
                    return
                if isinstance(value, list):
                    for i, v in enumerate(value):
                        if v is node:
                            value[i] = new
                            return
            raise RuntimeError("node not found in its parent")
        return apply

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.BinOp | ast.AugAssign) and type(node.op) in BINOP_SWAP:
            new = BINOP_SWAP[type(node.op)]
            out.append((node, line, f"{SYM[type(node.op)]} -> {SYM[new]}",
                        (lambda n=node, k=new: setattr(n, "op", k()))))
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in CMP_SWAP:
                    new = CMP_SWAP[type(op)]

                    def apply(n=node, i=i, k=new):
                        n.ops[i] = k()
                    out.append((node, line, f"{SYM[type(op)]} -> {SYM[new]}", apply))
        elif isinstance(node, ast.BoolOp):
            new = ast.Or if isinstance(node.op, ast.And) else ast.And
            out.append((node, line, f"{SYM[type(node.op)]} -> {SYM[new]}", (lambda n=node, k=new: setattr(n, "op", k()))))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
            what = "not x -> x" if isinstance(node.op, ast.Not) else "-x -> x"
            if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
                what = f"-{node.operand.value!r} -> {node.operand.value!r}"
            out.append((node, line, what, replace(node, node.operand)))
        elif isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool):
                out.append((node, line, f"{v} -> {not v}", (lambda n=node: setattr(n, "value", not n.value))))
            elif isinstance(v, int):
                out.append((node, line, f"{v} -> {v + 1}", (lambda n=node: setattr(n, "value", n.value + 1))))
            elif isinstance(v, float):
                out.append((node, line, f"{v!r} -> {v + 1.0!r}", (lambda n=node: setattr(n, "value", n.value + 1.0))))
    return out


def enumerate_mutants(files: list[str]) -> list[dict]:
    muts = []
    for f in files:
        src = (ROOT / f).read_text()
        for i, (_, line, desc, _) in enumerate(sites(ast.parse(src))):
            muts.append({"file": f, "index": i, "line": line, "mutation": desc, "code": src.splitlines()[line - 1].strip()})
    return muts


def mutated_source(path: Path, index: int | None) -> str:
    tree = ast.parse(path.read_text())
    if index is not None:
        sites(tree)[index][3]()
        ast.fix_missing_locations(tree)
    return ast.unparse(tree) + "\n"


def copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns(".git", "__pycache__", ".site", "outputs", "multirun", "lightning_logs", "wandb",
                                    "results", ".venv", "mutants", "*.png", ".cache")
    for name in ("framework", "kernels", "tests", "conf", "experiments"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    (dest / ".site").mkdir()
    (dest / ".site" / "memfit").symlink_to(dest / "framework")


def run_tests(tree: Path, args: list[str], timeout: float, log: Path) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout', seconds, first failing test) of the selection in a forked child."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child: fresh memfit import from the copy
        try:
            os.setpgid(0, 0)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(tree)
            site = str(tree / ".site")
            sys.path.insert(0, site)
            os.environ["PYTHONPATH"] = site + os.pathsep + os.environ.get("PYTHONPATH", "")
            import pytest

            rc = pytest.main([*args, *PYTEST_FLAGS, "--rootdir", str(tree)])
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(rc))
        except BaseException:  # noqa: B036 - anything in the child is a failed run
            import traceback

            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)
    status = None
    while time.perf_counter() - t0 < timeout:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(st)
            break
        time.sleep(0.05)
    dt = time.perf_counter() - t0
    if status is None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        return "timeout", dt, ""
    text = log.read_text(errors="replace")
    first = next((m.group(1) for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", text, re.M)), "")
    if status == 0:
        return "passed", dt, ""
    if status == 5:
        raise RuntimeError(f"no tests collected for {args}: see {log}")
    return "failed", dt, first or f"exit {status}"


def run_module(name: str, spec: dict, phase: str, max_mutants: int, seed: int, timeout: float,
               only: list[dict] | None) -> dict:
    muts = enumerate_mutants(spec["files"])
    total = len(muts)
    sample = sorted(random.Random(seed).sample(muts, max_mutants), key=lambda m: (m["file"], m["index"])) \
        if total > max_mutants else muts
    args = spec["tests"] + (spec["new"] if phase != "before" else [])
    # keep -k at the end: files first
    files = [a for a in args if a.startswith("tests/")]
    rest = [a for a in spec["tests"] if not a.startswith("tests/")]
    if phase != "before" and "-k" in rest:  # the -k filter is for the existing files: the new tests all run
        i = rest.index("-k") + 1
        rest[i] = f"({rest[i]}) or test_mutants_"
    args = files + rest
    with tempfile.TemporaryDirectory(prefix=f"mut_{name}_") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        for f in spec["files"]:  # null mutant: the unparsed, unmutated sources must pass
            (tree / f).write_text(mutated_source(ROOT / f, None))
        log = tree / "log.txt"
        status, clean, first = run_tests(tree, args, 600, log)
        if status != "passed":
            print(log.read_text()[-3000:])
            raise RuntimeError(f"{name}: the unmutated selection does not pass ({status} {first})")
        limit = min(timeout, max(20.0, 4 * clean))
        print(f"[{name}] {total} mutants, testing {len(sample)}; clean run {clean:.1f}s, timeout {limit:.0f}s",
              flush=True)
        todo = sample
        carried = []
        if only is not None:
            keys = {(m["file"], m["index"]) for m in only}
            todo = [m for m in sample if (m["file"], m["index"]) in keys]
            carried = [dict(m, status="killed", seconds=0.0, carried=True) for m in sample
                       if (m["file"], m["index"]) not in keys]
        results = []
        for k, m in enumerate(todo):
            src = tree / m["file"]
            src.write_text(mutated_source(ROOT / m["file"], m["index"]))
            try:
                status, dt, first = run_tests(tree, args, limit, log)
            finally:
                src.write_text(mutated_source(ROOT / m["file"], None))
            st = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[status]
            results.append(dict(m, status=st, seconds=round(dt, 2), killed_by=first))
            print(f"[{name}] {k + 1}/{len(todo)} {m['file']}:{m['line']} {m['mutation']:<14} {st:<8} {dt:5.1f}s "
                  f"{first}", flush=True)
    results = sorted(results + carried, key=lambda m: (m["file"], m["index"]))
    return {"module": name, "files": spec["files"], "selection": " ".join(args), "enumerated": total,
            "sampled": len(sample) < total, "seed": seed, "clean_seconds": round(clean, 2), "timeout": limit,
            "mutants": results}


def versions() -> str:
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    import pytest

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only; Python "
            f"{platform.python_version()}, torch {torch.__version__}, triton {tv}, pytest {pytest.__version__}")


def equivalent(m: dict) -> str | None:
    return EQUIVALENT.get((m["file"], m["line"], m["mutation"], m["index"])) or \
        EQUIVALENT.get((m["file"], m["line"], m["mutation"]))


def summary(mod: dict) -> dict:
    ms = mod["mutants"]
    killed = sum(m["status"] == "killed" for m in ms)
    tout = sum(m["status"] == "timeout" for m in ms)
    surv = sum(m["status"] == "survived" for m in ms)
    return {"tried": len(ms), "killed": killed, "timeout": tout, "survived": surv,
            "rate": (killed + tout) / max(1, len(ms))}


def write_md(data: dict) -> None:
    lines = ["# Mutation testing (CPU)", "",
             "Produced by `experiments/mutation.py` (an AST mutation runner; see its docstring for the operators).",
             f"Device/versions: {data.get('versions', '')}", "",
             "Timeouts are counted as killed (the mutant made the selection hang or run past its limit). "
             "Where a module has more mutation sites than `--max-mutants`, a seeded random sample was tested "
             "(`sampled` column); the after run uses the same sample.", ""]
    for phase in ("before", "after", "holdout", "holdout_recheck"):
        if phase not in data:
            continue
        run = data[phase]
        title = {"holdout_recheck": "Holdout, re-checked"}.get(phase, phase.capitalize())
        lines += [f"## {title}: {run['note']}", "",
                  "| module | sites | mutants tried | sampled (seed) | killed | timeout (= killed) | survived | kill rate "
                  "| survivors listed equivalent / CPU-unreachable | kill rate of the rest | test selection |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for mod in run["modules"].values():
            s = summary(mod)
            eq = sum(m["status"] == "survived" and equivalent(m) is not None for m in mod["mutants"])
            rest = (s["killed"] + s["timeout"]) / max(1, s["tried"] - eq)
            lines.append(f"| {mod['module']} | {mod['enumerated']} | {s['tried']} | "
                         f"{'yes (' + str(mod['seed']) + ')' if mod['sampled'] else 'no (all)'} | {s['killed']} | "
                         f"{s['timeout']} | {s['survived']} | {100 * s['rate']:.1f}% | {eq} | {100 * rest:.1f}% | "
                         f"`{mod['selection']}` |")
        lines.append("")
    lines += ["## Notes", "",
              "- Selections: only the test files that exercise the module, with `-x -q -p no:randomly "
              "-p no:cacheprovider`; slow interpreter/training tests are filtered out by `-k` where listed. In the "
              "after run the `-k` filter applies to the existing files only (`or test_mutants_`).",
              "- The after run re-tests only the before run's survivors: the after selection is a superset of the "
              "before one, so a mutant it killed before stays killed.",
              "- Kernel bodies under `@triton.jit` and the functions that launch them are not mutated (GPU code); "
              "CUDA-only branches of the dispatchers are, and where they survive they are listed as not reachable "
              "on CPU.",
              "- One product fix came out of the new tests (before this module's runs): `fmdelta_ref.msb64` gave 63 "
              "instead of 62 for magnitudes in [2^63 - 512, 2^63) (float64 rounding), so the torch path disagreed "
              "with the native coder and did not decode its own output for such float64 deltas "
              "(tests/kernels/test_mutants_fmdelta.py::test_msb64_known_answers, test_reference_extreme_deltas).", ""]
    before = data.get("before", {}).get("modules", {})
    after = data.get("after", {}).get("modules", {})
    lines += ["## Survivors of the before run", "",
              "| module | file:line | mutation | code | outcome |", "|---|---|---|---|---|"]
    for name, mod in before.items():
        amap = {(m["file"], m["index"]): m for m in after.get(name, {}).get("mutants", [])}
        for m in mod["mutants"]:
            if m["status"] != "survived":
                continue
            a = amap.get((m["file"], m["index"]))
            eq = equivalent(m)
            if a is not None and a["status"] != "survived":
                out = f"killed by `{a.get('killed_by') or a['status']}`"
            elif eq:
                out = eq if eq.startswith("not reachable") else f"equivalent: {eq}"
            elif a is None:
                out = "not re-run"
            else:
                out = "**survives** (not explained)"
            code = m["code"].replace("|", "\\|")[:90]
            lines.append(f"| {name} | {m['file']}:{m['line']} | `{m['mutation']}` | `{code}` | {out} |")
    hold = data.get("holdout", {}).get("modules", {})
    recheck = data.get("holdout_recheck", {}).get("modules", {})
    if hold:
        lines += ["", "## Survivors of the holdout run", "",
                  "| module | file:line | mutation | code | note |", "|---|---|---|---|---|"]
        for name, mod in hold.items():
            for m in mod["mutants"]:
                if m["status"] == "survived":
                    eq = equivalent(m)
                    again = {(x["file"], x["index"]): x for x in recheck.get(name, {}).get("mutants", [])}
                    r = again.get((m["file"], m["index"]))
                    if r is not None and r["status"] != "survived":
                        note = f"killed by `{r.get('killed_by') or r['status']}` (a test added after the holdout run)"
                    elif eq:
                        note = eq if eq.startswith("not reachable") else f"equivalent: {eq}"
                    else:
                        note = HOLDOUT_NOTES.get((m["file"], m["line"], m["mutation"]), "not analysed")
                    code = m["code"].replace("|", "\\|")[:90]
                    lines.append(f"| {name} | {m['file']}:{m['line']} | `{m['mutation']}` | `{code}` | {note} |")
    (RESULTS / "mutation.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modules", nargs="*", default=list(MODULES), choices=list(MODULES))
    ap.add_argument("--phase", choices=["before", "after", "holdout"], default="before",
                    help="holdout: the after selection on a fresh sample (another --seed), every mutant run")
    ap.add_argument("--max-mutants", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0, help="per-mutant limit (s), capped at 4x the clean run")
    ap.add_argument("--only-survivors", action="store_true",
                    help="after phase: re-run only the before-run's survivors (killed mutants stay killed: tests "
                         "were only added); holdout phase: re-check the holdout run's survivors (holdout_recheck)")
    ap.add_argument("--report-only", action="store_true", help="rewrite mutation.md from mutation.json")
    args = ap.parse_args()
    sys.dont_write_bytecode = True
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = RESULTS / "mutation.json"
    data = json.loads(out.read_text()) if out.exists() else {}
    if args.report_only:
        write_md(data)
        return
    # imported once here, before forking per mutant (memfit itself is imported fresh in each child)
    for mod in ("numpy", "torch", "pytest", "triton", "lightning", "hydra", "omegaconf", "safetensors"):
        try:
            __import__(mod)
        except ImportError:
            pass
    data["versions"] = versions()
    key = "holdout_recheck" if args.phase == "holdout" and args.only_survivors else args.phase
    run = data.setdefault(key, {"modules": {}})
    if key == "holdout_recheck":
        args.phase = "holdout_recheck"
    run["note"] = {"before": "current tests",
                   "after": "with the tests/test_mutants_*.py files added" +
                   ("; only the before-run's survivors re-run, mutants killed before counted as killed"
                    if args.only_survivors else ""),
                   "holdout": f"the after selection on a fresh sample (seed {args.seed}) that the new tests were "
                   "not written against, every mutant run",
                   "holdout_recheck": "the holdout run's survivors re-run with the tests added after it (mutants "
                   "the holdout run killed counted as killed)"}[args.phase]
    for name in args.modules:
        only = None
        if args.only_survivors:
            src = "holdout" if args.phase == "holdout" else "before"
            prev = data.get(src, {}).get("modules", {}).get(name)
            if prev is None:
                raise SystemExit(f"--only-survivors: no {src} run of {name}")
            only = [m for m in prev["mutants"] if m["status"] == "survived"]
        spec = MODULES[name]
        if args.phase != "before":
            missing = [f for f in spec["new"] if not (ROOT / f).exists()]
            spec = dict(spec, new=[f for f in spec["new"] if f not in missing])
        res = run_module(name, spec, args.phase, args.max_mutants, args.seed, args.timeout, only)
        run["modules"][name] = res
        s = summary(res)
        print(f"[{name}] {args.phase}: killed {s['killed']} + timeout {s['timeout']} of {s['tried']} "
              f"({100 * s['rate']:.1f}%), survived {s['survived']}", flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1) + "\n")
        write_md(data)


if __name__ == "__main__":
    main()
