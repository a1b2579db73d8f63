"""QLoRA vs LoftQ vs QPiSSA on an NF4 base: `experiments/pissa_vs_lora.py --quantized` (same recipe, storage=nf4).

    python experiments/qpissa_vs_qlora.py [--steps N --seeds 0 1 2 ...]  # -> experiments/results/qpissa_vs_qlora.{md,png}
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "--quantized", *sys.argv[1:]]
    runpy.run_path(str(Path(__file__).with_name("pissa_vs_lora.py")), run_name="__main__")
