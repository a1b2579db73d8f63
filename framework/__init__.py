"""memfit: memory-efficient fine-tuning of causal LMs on Lightning.

One import namespace: this folder (framework/ in a checkout) is the package `memfit`, and the checkout's top-level
kernels/ folder is `memfit.kernels`. That folder has no __init__.py on purpose: where a checkout's root is first on
sys.path (`python -m`, pytest, launch.sh) a regular package there named `kernels` would shadow Hugging Face's `kernels`
package, which transformers imports. Installed from a wheel, memfit/kernels/ sits inside this package and is found as
usual; in a checkout (editable install) `_register_checkout_kernels` points `memfit.kernels` at ../kernels.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

# The public API: name -> the module defining it. Resolved on first use (PEP 562), so `import memfit` stays light
# (no torch, Lightning or Triton import until a name is asked for).
_API = {
    # the app: compose a config, assemble the model it names, train
    # (assemble itself: `from memfit.assemble import assemble`, as its module of the same name shadows a lazy name)
    "compose": "memfit.config", "run": "memfit.train",
    # a finished run: its weights and config back; export as an HF directory
    "load_full_state": "memfit.runs", "run_model": "memfit.runs", "export_hf": "memfit.export",
    # the pieces, usable without the app
    "apply_adapter": "memfit.adapters", "build_storage": "memfit.quant.storage",
    "compress_dir": "memfit.compression.fmdelta_dir", "decompress_dir": "memfit.compression.fmdelta_dir",
    "linear_cross_entropy": "memfit.kernels.cce", "quantize_nf4": "memfit.kernels.nf4",
    "dequantize_nf4": "memfit.kernels.nf4", "ans_encode": "memfit.kernels.ans", "ans_decode": "memfit.kernels.ans",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:
    if name not in _API:
        raise AttributeError(f"module 'memfit' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


def _register_checkout_kernels() -> None:
    here = Path(__file__).resolve().parent
    if (here / "kernels").is_dir() or "memfit.kernels" in sys.modules:
        return
    src = here.parent / "kernels"
    if not (src / "settings.py").is_file():
        return
    spec = importlib.machinery.ModuleSpec("memfit.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(src)]
    module = importlib.util.module_from_spec(spec)
    sys.modules["memfit.kernels"] = module
    globals()["kernels"] = module


if __name__ == "memfit":
    _register_checkout_kernels()
else:  # imported as `framework` from a checkout's root (`python -m framework.train`, the old spelling): same package
    import memfit as _memfit

    sys.modules[__name__] = _memfit
