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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
PYTEST_FLAGS = ["-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-W", "ignore"]

# module -> source files and the test selection that exercises them ("new" is added in the after phase)
MODULES: dict[str, dict] = {
    "rans": {
        "files": ["kernels/ans/__init__.py", "kernels/ans/native.py"],
        "tests": ["tests/kernels/test_ans.py", "-k", "not triton_interpreter"],
        "new": ["tests/kernels/test_mutants_rans.py"],
    },
    "fmdelta": {
        "files": ["kernels/fmdelta/__init__.py", "kernels/fmdelta/reference.py",
                  "framework/compression/container.py"],
        "tests": ["tests/kernels/test_fmdelta_codec.py", "tests/compression/test_fmdelta_container.py"],
        "new": ["tests/kernels/test_mutants_fmdelta.py"],
    },
    "neuzip": {
        "files": ["framework/quant/neuzip.py"],
        "tests": ["tests/quant/test_neuzip.py", "-k", "not run_neuzip"],
        "new": ["tests/quant/test_mutants_neuzip.py"],
    },
    "nf4": {
        "files": ["kernels/nf4/__init__.py", "framework/quant/nf4.py"],
        "tests": ["tests/quant/test_nf4.py", "tests/quant/test_nf4_linear.py", "-k",
                  "not triton_interpreter and not storage_nf4_trains"],
        "new": ["tests/quant/test_mutants_nf4.py"],
    },
    "cce": {
        "files": ["kernels/cce/__init__.py", "kernels/cce/reference.py", "framework/loss.py"],
        "tests": ["tests/kernels/test_cce_api.py", "tests/kernels/test_cce.py", "-k", "(torch or bad_input or autocast or loss_class) "
                  "and not compile and not opcheck and not triton"],
        "new": ["tests/kernels/test_mutants_cce.py"],
    },
    "adapter_inits": {
        "files": ["framework/adapters/inits.py", "framework/adapters/svd.py"],
        "tests": ["tests/adapters/test_adapters.py", "tests/adapters/test_qpissa.py", "-k", "not train_run and not end_to_end"],
        "new": ["tests/adapters/test_mutants_adapters.py"],
    },
    "fmdelta_callback": {
        "files": ["framework/callbacks/fmdelta.py"],
        "tests": ["tests/callbacks/test_fmdelta_callback.py"],
        "new": ["tests/callbacks/test_mutants_fmdelta_callback.py"],
    },
}

# survivors judged equivalent (file, line, mutation) -> why; filled in from the before-run's survivors
EQUIVALENT: dict[tuple, str] = {  # (file, line, mutation[, site index where a line has two alike])
    ("kernels/ans/__init__.py", 110, "False -> True"):
        "`compare=` of the cached decode table: ANSEncoded is never compared with ==, and a dataclass == over "
        "tensor fields raises either way",
    ("kernels/ans/__init__.py", 207, "True -> False"):
        "`copy=True` in an int32 -> int64 conversion: a dtype change always copies",
    ("kernels/ans/__init__.py", 240, "// -> /"):
        "ceil(n / lanes) >= 2**32 as a float: differs from the integer test only for more than 2**32 symbols per lane",
    ("kernels/ans/__init__.py", 240, "1 -> 2"):
        "not reachable in a test: moves a 2**32 limit (symbols per lane, lanes) to 2**33; reaching either needs over "
        "4e9 symbols or 4e9 lanes (32 GB of lane tables)",
    ("kernels/ans/__init__.py", 316, "256 -> 257"):
        "torch.bincount fallback (no C++ compiler) with one extra zero bin: the table is cut after the last used "
        "symbol, so the result is the same",
    ("kernels/ans/native.py", 108, "1 -> 2"):
        "one more zero word of padding after the stream: the decoder never reads past the first pad word",
    ("kernels/fmdelta/__init__.py", 68, "% -> //"):
        "not reachable on CPU: `_use_gpu_kernels` returns False for CPU tensors before this line",
    ("kernels/fmdelta/__init__.py", 185, "64 -> 65"):
        "a valid block needs at most ceil(block * (W - 1) / 64) words, below both bounds (W <= 64); a crafted table "
        "between the bounds is rejected either way (here, or by the decoder's consistency check)",
    ("kernels/fmdelta/reference.py", 24, "< -> <="):
        "msb64 is only called on positive magnitudes (zeros are replaced by ones first): mag == 0 never occurs",
    ("kernels/fmdelta/reference.py", 100, "2 -> 3"):
        "one more zero word of padding: an element spans at most two words, so the third is never read",
    ("framework/quant/neuzip.py", 287, "is not -> is"):
        "not reachable on CPU: the Triton decode branch (CUDA, or use_triton=True under the Triton interpreter), "
        "outside this CPU selection",
    ("framework/quant/nf4.py", 167, "== -> !="):
        "not reachable on CPU: `_use_fused` starts with `a.is_cuda and ...`, so the rest of the condition is never evaluated on CPU",
    ("framework/quant/nf4.py", 167, "<= -> <"):
        "not reachable on CPU: `_use_fused` starts with `a.is_cuda and ...`, so the rest of the condition is never evaluated on CPU",
    ("framework/quant/nf4.py", 167, "% -> //"):
        "not reachable on CPU: `_use_fused` starts with `a.is_cuda and ...`, so the rest of the condition is never "
        "evaluated on CPU",
    ("framework/quant/nf4.py", 176, "is not -> is"):
        "not reachable on CPU: inside the fused-kernel branch of nf4_mm (CUDA only)",
    ("framework/quant/nf4.py", 179, "1 -> 2"):
        "not reachable on CPU: inside the fused-kernel branch of nf4_mm (CUDA only)",
    ("kernels/nf4/__init__.py", 127, "is not -> is"):
        "not reachable on CPU: only defines the Triton kernel, which runs on CUDA or under the Triton interpreter",
    ("kernels/cce/reference.py", 73, "0 -> 1", 32):  # e.shape[0] (the c.shape[0] one is killed)
        "in grad_torch `n` only sets the vocabulary chunk width (budget // n); every chunking gives the same exact "
        "gradients",
    ("framework/quant/nf4.py", 173, "0 -> 1"):
        "not reachable on CPU: `n` (and `width` for trans=True) only feed the fused CUDA kernel's selection and call: unused on CPU",
    ("kernels/ans/__init__.py", 240, ">= -> >"):
        "not reachable in a test: the per-lane limit at exactly 2**32 symbols (over 4e9 symbols)",
    ("kernels/ans/__init__.py", 240, "-x -> x"):
        "not reachable in a test: drops the per-lane limit, which only fires beyond 2**32 symbols per lane",
    ("kernels/ans/__init__.py", 316, "is not -> is"):
        "torch.bincount instead of the C++ histogram: the same counts (only slower)",
    ("kernels/fmdelta/__init__.py", 24, "<< -> >>"):
        "not reachable on CPU: GPU_SEGMENT is only the default segment size for CUDA tensors",
    ("kernels/fmdelta/__init__.py", 24, "26 -> 27"):
        "not reachable on CPU: GPU_SEGMENT is only the default segment size for CUDA tensors",
    ("kernels/fmdelta/__init__.py", 68, "0 -> 1"):
        "not reachable on CPU: `_use_gpu_kernels` returns False for CPU tensors before this line",
    ("kernels/fmdelta/__init__.py", 118, "-x -> x"):
        "not reachable on CPU: the segment default for CUDA tensors (`if cuda`)",
    ("kernels/fmdelta/__init__.py", 185, "// -> /"):
        "block_words are integers: bw > (b*W + 63) / 64 holds exactly when bw > (b*W + 63) // 64",
    ("framework/quant/neuzip.py", 50, "0 -> 1"):
        "`_Store.version` only feeds equality tests against a value read from the same store (prefetch "
        "staleness); its starting value does not matter",
    ("framework/quant/neuzip.py", 239, "and -> or"):
        "with param_dtype None the mutant calls dense.to(None), and with the weight's own dtype dense.to(dtype): "
        "both return the tensor unchanged",
    ("framework/quant/neuzip.py", 246, "1 -> 2"):
        "the all-gather hands back 1 tensor (FSDP2's 1-rank shortcut) or 5-6 (one per compressed part), never 2",
    ("framework/quant/neuzip.py", 292, "False -> True"):
        "ans_decode's CPU path validates whatever `validate` says (the flag only skips host syncs on CUDA)",
    ("framework/adapters/svd.py", 45, "== -> !="):
        "whether a 2-D weight gets a batch dimension of 1 (and 3-D gets a second one) does not matter: every step is "
        "batched over the leading dimensions and the result is un-batched to match",
    ("framework/adapters/svd.py", 45, "2 -> 3"):
        "whether a 2-D weight gets a batch dimension of 1 (and 3-D gets a second one) does not matter: every step is "
        "batched over the leading dimensions and the result is un-batched to match",
    ("framework/adapters/svd.py", 47, "-1 -> 1"):
        "picks which side's Gram matrix is decomposed: either side gives the exact top-r triplets (the larger one "
        "only costs more)",
    ("framework/adapters/svd.py", 47, "1 -> 2"):
        "picks which side's Gram matrix is decomposed: either side gives the exact top-r triplets (the larger one "
        "only costs more)",
    ("framework/adapters/svd.py", 47, ">= -> >"):
        "for a square weight both Gram matrices have the same size, and either side gives the same top-r triplets "
        "(the tests compare with float64 SVD within 1e-5 for square weights too)",
    ("framework/adapters/svd.py", 28, "-1 -> 1", 53):
        "`evals.flip(1)`: the eigenvalues are always a (b, k) stack here (`_finish` is only "
        "called from rayleigh_ritz on 3-D inputs), so dim 1 is dim -1 (the same mutation of `evecs.flip` is killed)",
    ("framework/adapters/svd.py", 72, "2 -> 3"):
        "a third Cholesky-QR pass over an already orthonormal basis returns it unchanged (to rounding)",
}
# survivors of the holdout sample, with what is known about them
HOLDOUT_NOTES: dict[tuple, str] = {
    ("kernels/ans/__init__.py", 73, "* -> /"):
        "(ci / m) // total is 0, so every used symbol starts at 1 slot and the greedy adds all units: adding by "
        "largest gain is exact for this separable concave objective, so the same optimum comes out (tables could "
        "differ only where two tables cost the same; no test found one), at the price of up to 2**prob_bits steps",
}

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
