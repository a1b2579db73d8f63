"""Compile the framework's Triton kernels for an H100/H200 (sm_90) on any machine, GPU or not, and report what the
cubin costs: registers per thread, spilled bytes, static shared memory, instruction count and the memory / sync
instruction mix of the SASS (vector widths of the loads, shuffles, barriers, atomics).

This answers "will this variant spill?", "are these loads vectorised?", "does this scan go through shared memory?"
before any GPU time is spent; it says nothing about speed. Pointers are compiled as 16-byte aligned and the ints
named in each preset as multiples of 16, as Triton specialises them at real launches.
Writes experiments/results/kernel_resources.md.
Usage: python experiments/kernel_resources.py [--only nf4,ans]
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
MEM_OPS = ("LDG", "STG", "LDS", "STS", "LDSM", "STSM", "ATOMG", "RED", "BAR", "SHFL", "LDL", "STL", "REDUX")


def compile_sm90(fn, signature: dict[str, str], constexprs: dict, *, warps: int = 4, stages: int = 1,
                 div16: tuple[str, ...] = (), aligned: bool = True):
    """The CompiledKernel of `fn` for sm_90: pointers 16-byte aligned (unless `aligned` is False), the ints in
    `div16` multiples of 16.

    A kernel defined while TRITON_INTERPRET=1 is re-wrapped as a compilable JITFunction (it must call no other
    interpreted @triton.jit function)."""
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        fn = JITFunction(fn.fn)
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    div = [k for k, v in signature.items() if v.startswith("*") and aligned] + list(div16)
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in div}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})


def resources(kernel) -> dict:
    """Registers, spilled bytes (stack + local), shared bytes per program, SASS instruction count and memory/sync op
    counts."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\D+.*?STACK:(\d+)\D+.*?LOCAL:(\d+)", usage, re.S)
    ops = [re.sub(r"^\s*/\*[0-9a-f]+\*/\s+", "", ln).split(";")[0].split()
           for ln in sass.splitlines() if re.match(r"^\s*/\*[0-9a-f]+\*/\s+\S", ln)]
    names = [w[1] if w[0].startswith("@") and len(w) > 1 else w[0] for w in ops if w]
    mix = collections.Counter(n for n in names if n.split(".")[0] in MEM_OPS)
    return {"regs": int(m.group(1)) if m else -1,
            "spill": int(m.group(2)) + int(m.group(3)) if m else -1,  # stack frame (spilled registers) + local
            "shared": int(kernel.metadata.shared), "instructions": len(names), "mix": dict(sorted(mix.items()))}


def nf4_rows() -> list[tuple[str, dict]]:
    """The few-row NF4 kernels for the 4096x4096 candidates of the first-use autotune (forward 1 row, backward 1)."""
    import memfit.kernels.nf4.matmul as nm

    common = {"a_ptr": "*bf16", "packed_ptr": "*u8", "s_ptr": "*fp32", "s2_ptr": "*fp32", "code_ptr": "*fp32",
              "code8_ptr": "*fp32", "out_ptr": "*bf16", "ws_ptr": "*fp32", "lock_ptr": "*i32"}
    fwd = {**common, "M": "i32", "N": "i32", "K": "i32", "s_am": "i32", "s_ak": "i32", "offset": "fp32"}
    bwd = {**common, "N": "i32", "K": "i32", "s_ak": "i32", "offset": "fp32"}
    rows = []
    for trans in (False, True):
        for c in nm.candidate_configs(4096, 4096, trans, 132, 1, 64):
            if not c.gemv:
                continue
            code = {"code_ptr": "*i64" if c.pairs else "*fp32"}
            meta = {"BS": 64, "DQ": False, "TN": c.tn, "TKB": c.tkb, "SPLIT": c.split, "PAIRS": c.pairs}
            if trans:
                k = compile_sm90(nm._nf4_gemv_t_kernel, {**bwd, **code}, meta, warps=c.warps, stages=c.stages,
                                 div16=("N", "K"))
            else:
                k = compile_sm90(nm._nf4_gemv_kernel, {**fwd, **code}, {**meta, "BM": 1}, warps=c.warps,
                                 stages=c.stages, div16=("N", "K", "s_am"))
            rows.append((f"nf4 {'g@W' if trans else 'x@W^T'} 1 row, tn={c.tn} tkb={c.tkb} split={c.split} "
                         f"warps={c.warps} stages={c.stages}{' pairs' if c.pairs else ''}", resources(k)))
    return rows


def ans_rows() -> list[tuple[str, dict]]:
    """The fused NeuZip decode (bf16, lossless) with and without prefetch and 4-byte tables, and the layout
    prototype's grouped-word decoder."""
    from experiments.ans_layout_proto import _decode_proto
    from memfit.kernels.ans import gpu as at

    sig = {"words_ptr": "*i16", "offs_ptr": "*i64", "states_ptr": "*i64", "tab_ptr": "*i64", "packed_ptr": "*u8",
           "out_ptr": "*i16", "end_x_ptr": "*i64", "end_p_ptr": "*i64", "n": "i64", "lanes": "i64", "steps": "i32"}
    base = {"PROB_BITS": 12, "MERGE": True, "K": 7, "MAN_BITS": 7, "SIGN_SHIFT": 15, "WIDE": False, "PLANES": 1,
            "REST": 0, "VALIDATE": False, "BLOCK": 128}
    rows = []
    for pre in (False, True):
        for t32 in (False, True):
            k = compile_sm90(at._decode_kernel, {**sig, "tab_ptr": "*i32" if t32 else "*i64"},
                             {**base, "PREFETCH": pre, "TAB32": t32})
            rows.append((f"neuzip decode bf16, prefetch={pre}, {4 if t32 else 8}-byte table", resources(k)))
    psig = {"words_ptr": "*i16", "starts_ptr": "*i64", "states_ptr": "*i64", "tab_ptr": "*i32", "out_ptr": "*u8",
            "n": "i64", "lanes": "i64", "steps": "i32"}
    for grouped, g in ((False, 128), (True, 32), (True, 128)):
        k = compile_sm90(_decode_proto, psig, {"PROB_BITS": 12, "BLOCK": 128, "G": g, "GROUPED": grouped,
                                               "TAB32": True})
        rows.append((f"rANS symbols prototype, {'grouped words G=' + str(g) if grouped else 'per-lane words'}, "
                     "4-byte table", resources(k)))
    return rows


def cce_rows() -> list[tuple[str, dict]]:
    """The CCE forward tiles the autotune times, with 32- and 64-bit element offsets, and the default backward."""
    from memfit.kernels.cce import bwd as cce_bwd
    from memfit.kernels.cce import fwd as cce_fwd

    sig = {"E": "*bf16", "C": "*bf16", "Bias": "*bf16", "LsePart": "*fp32", "SPart": "*fp32", "N": "i32", "V": "i32",
           "D": "i32", "stride_e": "i32", "stride_c": "i32", "tiles_per_split": "i32", "softcap": "fp32"}
    rows = []
    for wide in (False, True):
        for bn, bv, bd, w, st in cce_fwd.CANDIDATES:
            k = compile_sm90(cce_fwd._fwd_kernel, sig, {"HAS_BIAS": False, "SOFTCAP": False, "SUMZ": False,
                             "PRECISION": "tf32", "UPCAST": False, "WIDE": wide, "BLOCK_N": bn, "BLOCK_V": bv,
                             "BLOCK_D": bd}, warps=w, stages=st, div16=("D", "stride_e", "stride_c"))
            rows.append((f"cce forward {bn}x{bv}x{bd}, {w} warps, {st} stages, {64 if wide else 32}-bit offsets",
                         resources(k)))
    bsig = {"E": "*bf16", "C": "*bf16", "Bias": "*bf16", "Rows": "*i64", "Tgt": "*i64", "Lse": "*fp32", "A": "*fp32",
            "B": "*fp32", "U": "*fp32", "Perm": "*i64", "DE": "*fp32", "DC": "*bf16", "DB": "*fp32", "M": "i32",
            "V": "i32", "D": "i32", "stride_e": "i32", "stride_c": "i32", "n_blocks": "i32", "softcap": "fp32",
            "eps": "fp32"}
    bn, bv, bd, w, st = cce_bwd._config(cce_bwd.torch.bfloat16, cce_bwd.torch.device("cuda"))
    for srt in (False, True):
        k = compile_sm90(cce_bwd._bwd_kernel, bsig, {"HAS_BIAS": False, "SOFTCAP": False, "HAS_U": False,
                         "FILTER": True, "SORTED": srt, "PRECISION": "tf32", "UPCAST": False, "BLOCK_N": bn,
                         "BLOCK_V": bv, "BLOCK_D": bd}, warps=w, stages=st, div16=("D", "stride_e", "stride_c"))
        rows.append((f"cce backward {bn}x{bv}x{bd}, {w} warps, {st} stages, filtered, "
                     f"{'sorted' if srt else 'unsorted'} vocabulary", resources(k)))
    return rows


PRESETS = {"nf4": nf4_rows, "ans": ans_rows, "cce": cce_rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(PRESETS), help="comma-separated presets: " + ", ".join(PRESETS))
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "kernel_resources.md"))
    a = ap.parse_args()
    lines = ["# Kernel resources for sm_90 (compiled without a GPU)", "",
             f"triton {triton.__version__}; pointers 16-byte aligned, named ints multiples of 16 (as at real "
             "launches). regs = registers per thread (occupancy: 65536 / (regs x threads per program) programs per "
             "SM at most); spill = stack + local bytes per thread (spilled registers; STL/LDL in the mix); shared = bytes of "
             "shared memory per program (dynamic, pipeline stages included); mix = memory and synchronisation SASS "
             "instructions in the whole kernel (loop bodies count once).", "",
             "| kernel | regs | spill B | shared B | SASS instructions | memory / sync mix |", "|---|---|---|---|---|---|"]
    for name in a.only.split(","):
        for label, r in PRESETS[name]():
            mix = ", ".join(f"{k} {v}" for k, v in r["mix"].items())
            lines.append(f"| {label} | {r['regs']} | {r['spill']} | {r['shared']} | {r['instructions']} | {mix} |")
            print(lines[-1], flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
