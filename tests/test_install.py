"""The install: one import namespace (`memfit`) that never shadows the ecosystem's packages.

Hugging Face's `kernels` package (a transformers dependency, import name `kernels`) must win over the checkout's
kernels/ folder from any working directory, the repository root included, where `python -m`, pytest and launch.sh put
the checkout first on sys.path; transformers must load a model with hub kernels on; and our own Triton kernels must
import and run as `memfit.kernels`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, sys, tempfile
import torch
import kernels
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from memfit.kernels.cce import linear_cross_entropy
from memfit.kernels.nf4 import dequantize_nf4, quantize_nf4

cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=64)
torch.manual_seed(0)
src = LlamaForCausalLM(cfg).eval()
with tempfile.TemporaryDirectory() as d:
    src.save_pretrained(d)
    loaded = AutoModelForCausalLM.from_pretrained(d, use_kernels=True).eval()
x = torch.randint(0, 64, (2, 7))
same_logits = torch.equal(src(x).logits, loaded(x).logits)
e, c, t = torch.randn(5, 32, dtype=torch.float64), torch.randn(64, 32, dtype=torch.float64), torch.randint(0, 64, (5,))
cce = float(linear_cross_entropy(e, c, t))
ref = float(torch.nn.functional.cross_entropy(e @ c.T, t))
w = torch.randn(64, 64)
codes, absmax = quantize_nf4(w, 64)[:2]
deq = dequantize_nf4(codes, absmax, w.shape, 64, torch.float32)
print(json.dumps({"kernels_file": kernels.__file__, "use_kernels": bool(getattr(loaded, "use_kernels", True)),
                  "same_logits": same_logits, "cce": cce, "ref": ref,
                  "nf4_err": float((deq - w).abs().max() / w.abs().max())}))
"""


def _probe(cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=cwd, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_hub_kernels_and_ours_coexist(where, tmp_path):
    pytest.importorskip("kernels")  # Hugging Face's package: transformers >= 5.25 requires it
    res = _probe(ROOT if where == "repository root" else tmp_path)
    hf = Path(res["kernels_file"]).resolve()
    assert hf.parent != ROOT / "kernels", f"`import kernels` resolved to the checkout: {res}"
    assert hf.parent.parent.name in ("site-packages", "dist-packages"), hf
    assert res["same_logits"], "the model loaded with hub kernels on differs from the one saved"
    assert abs(res["cce"] - res["ref"]) <= 1e-9 * max(1.0, abs(res["ref"]))  # float64 CCE against cross_entropy
    assert res["nf4_err"] <= 0.5 * (1.0 - 0.7229568362236023) + 1e-6  # half the widest NF4 code gap, absmax-scaled


def test_no_top_level_package_of_ours_at_the_root():
    """kernels/ must not be a regular package (it would shadow HF's `kernels`); framework/ is `memfit` when installed."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    out = subprocess.run([sys.executable, "-c", "import memfit, memfit.kernels; print(memfit.__file__); "
                          "print(list(memfit.kernels.__path__)[0])"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    init, kdir = out.stdout.split()
    assert Path(init) == ROOT / "framework" / "__init__.py" and Path(kdir) == ROOT / "kernels"


def test_every_package_folder_is_installed():
    """pyproject's explicit package list covers every folder with an __init__.py (and kernels/)."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    found = {"memfit.kernels"} | {
        "memfit" + "".join("." + p for p in init.parent.relative_to(ROOT / "framework").parts)
        for init in (ROOT / "framework").rglob("__init__.py")
    }
    found |= {"memfit.kernels." + ".".join(i.parent.relative_to(ROOT / "kernels").parts)
              for i in (ROOT / "kernels").rglob("__init__.py")}
    assert listed == found, f"missing: {sorted(found - listed)}, stale: {sorted(listed - found)}"
    assert conf["package-dir"] == {"memfit": "framework", "memfit.kernels": "kernels"}


def test_no_bare_kernels_or_framework_imports():
    """Every first-party import goes through `memfit` (a bare `kernels` import would pick up Hugging Face's)."""
    bad = []
    for path in [*ROOT.glob("framework/**/*.py"), *ROOT.glob("kernels/**/*.py"), *ROOT.glob("tests/*.py"),
                 *ROOT.glob("experiments/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("kernels", "framework")]
    assert not bad, bad


def test_old_module_spelling_still_runs_from_the_root():
    """`python -m framework.train` (the spelling before the `memfit` namespace) runs the same app from a checkout."""
    out = subprocess.run([sys.executable, "-m", "framework.train", "--cfg", "job", "adapter=lora"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "_target_: memfit.data.datamodule.TaskSuiteData" in out.stdout and "name: lora" in out.stdout


def test_public_api_names_resolve_to_their_definitions():
    """Every name in memfit.__all__ is the object its defining module holds (a stale entry fails here)."""
    import importlib
    import importlib.util

    import memfit

    for name in memfit.__all__:
        if name == "__version__":
            continue
        # a submodule of the same name would replace the lazy name once imported
        assert importlib.util.find_spec(f"memfit.{name}") is None, name
        obj = getattr(memfit, name)
        assert obj is getattr(importlib.import_module(memfit._API[name]), name), name
        assert callable(obj), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        memfit.nope  # noqa: B018
