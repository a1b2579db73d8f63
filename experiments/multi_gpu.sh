#!/usr/bin/env bash
# The multi-GPU run of issues 9/10 in ONE device call (kind nvidia-h200-x4, carry [".whl"]), from the repo root:
#     bash experiments/multi_gpu.sh
# Results: $OUT/{fsdp_equality.md,scaling.md,*.log,env.txt} and experiments/results/{fsdp_equality,scaling}.md.
#
# Time budget (< 8 min on 4 H200s; every stage has its own `timeout`, so one slow stage cannot eat the others):
#   setup: wheels, env check, import check                                   ~25 s (no cap; fails fast)
#   1. fsdp_equality --worlds 1,2: ~1.5B-param Llama shape (16 x 2048, vocab 128256), 3 variants x 50 steps x
#      4 x 1024 tokens. Frozen base + adapters + activation checkpointing ~ fwd + recompute + input-grad
#      = 3 x 2 x 1.24e9 (blocks + head) ~ 7.8 GFLOP/token incl. attention -> 50 x 4096 x 7.8e9 = 1.6 PFLOP per
#      variant and world: ~5 s at ~300 TFLOP/s (world 2: half per GPU), so ~25 s of compute in all; the rest is
#      overhead: checkpoint ~20 s, 2 spawns x ~15 s, 5-6 model builds x ~6 s, Triton compiles ~20 s,
#      per-step Python/FSDP hooks (~129 FSDP units) ~0.15 s x 300 steps                  ~160 s (cap 215 s)
#   2. scaling --worlds 1,2,4: 4 variants + peft peer, 6 steps x 4096 tokens per GPU (~38 TFLOP/step/GPU,
#      ~0.15 s): compute is ~5 s in all; 3 spawns x ~15 s + 15 builds x ~7 s + steps    ~180 s (cap 215 s)
#   expected ~370 s; worst case with the caps: 25 + 215 + 215 = 455 s plus copying: under 8 min.
# Both scripts isolate a failing variant (listed with its error; the others go on) and rewrite their table after every
# world size, so a timeout keeps what finished. NeuZip is skipped with its error where its FSDP2 hooks fail.
# CPU rehearsal of this very script (tiny shapes over gloo, results only under $OUT):
#     MULTI_GPU_SMOKE=1 PYTHON=.venv/bin/python OUT=/tmp/mg bash experiments/multi_gpu.sh
set -u
PY=${PYTHON:-python3}
SMOKE=${MULTI_GPU_SMOKE:+--smoke}
SITE=${SITE:-/tmp/site}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-/tmp/multi_gpu_out}
mkdir -p "$OUT"
export OUT
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

stamp "install carried wheels"
if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl; then
  [ -n "$SMOKE" ] || { echo "wheel install failed"; exit 1; }
  echo "(rehearsal: wheels not installable for this python; using its own packages)"
fi
export PYTHONPATH=$SITE:$PWD

# framework/ imports `lightning`; if the image only has the pytorch-lightning distribution (the same code as
# pytorch_lightning + lightning_fabric), alias lightning.pytorch / lightning.fabric to it.
if ! "$PY" -c "import lightning.pytorch" 2>/dev/null && "$PY" -c "import pytorch_lightning" 2>/dev/null; then
  echo "no 'lightning' package: aliasing lightning.pytorch -> pytorch_lightning, lightning.fabric -> lightning_fabric"
  mkdir -p /tmp/shim/lightning
  cat > /tmp/shim/lightning/__init__.py <<'EOF'
import importlib
import importlib.abc
import importlib.util
import sys

_MAP = {"lightning.pytorch": "pytorch_lightning", "lightning.fabric": "lightning_fabric"}


def _real(name):
    for alias, real in _MAP.items():
        if name == alias or name.startswith(alias + "."):
            return real + name[len(alias):]
    return None


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if _real(name) else None

    def create_module(self, spec):
        return importlib.import_module(_real(spec.name))

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Alias())
from pytorch_lightning import *  # noqa: E402,F401,F403
from pytorch_lightning import __version__  # noqa: E402,F401
EOF
  export PYTHONPATH=/tmp/shim:$PYTHONPATH
fi

stamp "environment"
{
  nvidia-smi -L
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda',
torch.version.cuda, '| GPUs', torch.cuda.device_count())"
  "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|peft|lightning|pytorch-lightning|hydra-core|omegaconf|safetensors|bitsandbytes|cut-cross-entropy) "
} 2>&1 | tee "$OUT/env.txt"
"$PY" -c "
import sys; sys.path.insert(0, 'experiments')
import fsdp_equality, scaling, hydra, omegaconf  # noqa
from memfit.parallel.fsdp import shard_model  # noqa
from memfit.quant import apply_storage  # noqa
from memfit.adapters import apply_adapter  # noqa
print('imports ok')" 2>&1 | tail -5 | tee -a "$OUT/env.txt"
grep -q "imports ok" "$OUT/env.txt" || { echo "import check failed: see above"; exit 1; }

CKPT=/tmp/llama_1b_random${SMOKE:+_smoke}   # made once by the first script, reused by the second
EQ=experiments/results/fsdp_equality.md
SC=experiments/results/scaling.md
WORLDS=1,2,4
if [ -n "$SMOKE" ]; then EQ=$OUT/fsdp_equality.md; SC=$OUT/scaling.md; WORLDS=1,2; fi

stamp "1. fsdp_equality --worlds 1,2 (cap 215 s)"
timeout -k 5 215 "$PY" experiments/fsdp_equality.py --worlds 1,2 --ckpt "$CKPT" --out "$EQ" $SMOKE \
  > "$OUT/fsdp_equality.log" 2>&1
echo "exit code $?"
grep -E "^\[world|FAILED|Error|error" "$OUT/fsdp_equality.log" | tail -20
[ "$EQ" = "$OUT/fsdp_equality.md" ] || cp "$EQ" "$OUT/fsdp_equality.md" 2>/dev/null

stamp "2. scaling --worlds $WORLDS (cap 215 s)"
timeout -k 5 215 "$PY" experiments/scaling.py --worlds $WORLDS --steps 6 --warmup 2 --ckpt "$CKPT" --out "$SC" \
  $SMOKE > "$OUT/scaling.log" 2>&1
echo "exit code $?"
grep -E "FAILED|Error|error" "$OUT/scaling.log" | tail -10
[ "$SC" = "$OUT/scaling.md" ] || cp "$SC" "$OUT/scaling.md" 2>/dev/null

stamp "done"
for f in fsdp_equality.md scaling.md; do
  echo; echo "----- $f"; cat "$OUT/$f" 2>/dev/null || echo "(missing: see $OUT/${f%.md}.log)"
done
