#!/usr/bin/env bash
# The multi-GPU run in ONE device call (a kind with 2 or 4 GPUs, carry [".whl"]), from the repo root:
#     bash experiments/multi_gpu.sh            # WORLDS=1,2,4 by default; WORLDS=1,2 on a 2-GPU kind
# experiments/scaling.py runs the app (`python -m memfit.train experiment=headline trainer=fsdp trainer.devices=N`) per
# world size and stack: tokens/s, scaling efficiency, peak memory per rank, and the per-step loss gap between world 1
# and world N on the same global batches. Results: $OUT/scaling.{md,log}, env.txt; experiments/results/scaling.md.
# CPU rehearsal (tiny shapes over gloo): MULTI_GPU_SMOKE=1 OUT=/tmp/mg bash experiments/multi_gpu.sh
set -u
SMOKE=${MULTI_GPU_SMOKE:+--smoke}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_DISABLE_PROGRESS_BARS=1
OUT=${OUT:-/tmp/multi_gpu_out}
mkdir -p "$OUT"
export OUT
if [ -z "$SMOKE" ]; then source experiments/device_env.sh > "$OUT/env.txt" 2>&1; cat "$OUT/env.txt"; PY=python3
else PY=${PYTHON:-.venv/bin/python}; fi
SC=experiments/results/scaling.md
WORLDS=${WORLDS:-1,2,4}
if [ -n "$SMOKE" ]; then SC=$OUT/scaling.md; WORLDS=1,2; fi
timeout -k 5 500 "$PY" experiments/scaling.py --worlds "$WORLDS" --out "$SC" $SMOKE > "$OUT/scaling.log" 2>&1
echo "exit code $?"
cp "$SC" "$OUT/scaling.md" 2>/dev/null; cat "$OUT/scaling.md" 2>/dev/null || tail -20 "$OUT/scaling.log"
