#!/usr/bin/env bash
# One single-GPU device call: the app's GPU composition matrix first, then the per-issue benchmarks, the headline and NeuZip memory tables, then every `-m gpu`
# test. Each stage runs under its own time cap (SIGKILL, so nothing it started outlives it) so one slow stage cannot
# eat the others; every script writes its table as it goes, so a capped stage keeps what it measured. The tests come
# last: a killed test run can leave worker processes that share the GPU with whatever runs next and skew its timings.
# Carry (repo-root folders, ignored by git): .whl (hydra/omegaconf/datasets), .whl-bnb (bitsandbytes), .whl-peers
# (cut-cross-entropy, liger-kernel; ../shared/tools/device-wheels.sh --peers) and .cache/nf4_real (real weights for
# nf4_vs_bnb: `python experiments/nf4_vs_bnb.py --make-real` on a machine with the dev extra installed).
# STAGES picks stages (default: all); T_<STAGE> caps them in seconds. Results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TQDM_DISABLE=1 TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-/tmp/gpu_suite}; mkdir -p "$OUT"; export OUT
STAGES=${STAGES:-"app nf4 cce fmdelta fmthreads neuzip anslayout headline nzmem tests"}
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }
source experiments/device_env.sh
cap() { local t=$1; shift; timeout -s KILL "$t" "$@"; }
if want app; then
  stamp "app matrix (pytest -m gpu tests/test_app_gpu.py tests/test_checkpointing.py)"
  cap "${T_APP:-240}" python3 -m pytest -q -m gpu tests/test_app_gpu.py tests/test_checkpointing.py -p no:cacheprovider \
    -p no:randomly -rf --tb=short > "$OUT/pytest_app_gpu.txt" 2>&1
  tail -15 "$OUT/pytest_app_gpu.txt"
fi
if want nf4; then
  stamp "nf4_vs_bnb"
  cap "${T_NF4:-130}" python3 experiments/nf4_vs_bnb.py --out "$OUT/nf4_vs_bnb.md" > "$OUT/nf4_log.txt" 2>&1
  sed -n '/## Linear/,$p' "$OUT/nf4_vs_bnb.md" | head -30
fi
if want cce; then
  stamp "cce_bench"
  cap "${T_CCE:-150}" python3 experiments/cce_bench.py --out "$OUT/cce_bench.md" > "$OUT/cce_log.txt" 2>&1
  grep "Targets\|^| ours" "$OUT/cce_bench.md"
fi
if want fmdelta; then
  stamp "fmdelta_speed"
  FMDELTA_OUT=$OUT cap "${T_FMDELTA:-70}" python3 experiments/fmdelta_speed.py --device cuda > "$OUT/fmdelta_log.txt" 2>&1
  grep "^|" "$OUT/fmdelta_log.txt"
  # the same in a fresh process with the device memory reserved first: is the slow first pass cudaMalloc?
  FMDELTA_OUT=$OUT cap "${T_FMDELTA:-70}" python3 experiments/fmdelta_speed.py --device cuda --reserve \
    > "$OUT/fmdelta_reserved_log.txt" 2>&1
  grep "first pass" "$OUT/fmdelta_reserved_log.txt"
  # and with torch's CPU tensors on huge pages: is it host first-touch page faults?
  THP_MEM_ALLOC_ENABLE=1 FMDELTA_OUT=$OUT cap "${T_FMDELTA:-70}" python3 experiments/fmdelta_speed.py --device cuda \
    --reserve > "$OUT/fmdelta_thp_log.txt" 2>&1
  grep "first pass" "$OUT/fmdelta_thp_log.txt"
fi
if want fmthreads; then
  stamp "fmdelta CPU codec at 1 thread and at the default (all cores of this machine)"
  FMDELTA_OUT=$OUT cap "${T_FMTHREADS:-120}" python3 experiments/fmdelta_speed.py --device cpu --threads 1,0 \
    --tensors 8 --numel 8388608 --tag large > "$OUT/fmthreads_log.txt" 2>&1
  FMDELTA_OUT=$OUT cap "${T_FMTHREADS:-120}" python3 experiments/fmdelta_speed.py --device cpu --threads 1,0 \
    --tensors 64 --numel 65536 --tag small >> "$OUT/fmthreads_log.txt" 2>&1
  grep -h "^| FM" "$OUT"/fmdelta_speed_cpu_*.md
fi
if want neuzip; then
  stamp "neuzip_speed"
  cap "${T_NEUZIP:-90}" python3 experiments/neuzip_speed.py --sweep-sizes 128 --spl 256,512 \
    --shapes 128x4p,256x8p,128x4,128x4t,128x4pt,256x8pt --sizes 1,8,128,512,1024 --out "$OUT/neuzip_speed.md" > "$OUT/neuzip_log.txt" 2>&1
  tail -12 "$OUT/neuzip_speed.md"
fi
if want anslayout; then
  stamp "ans_layout_proto"
  cap "${T_ANSLAYOUT:-90}" python3 experiments/ans_layout_proto.py --out "$OUT/ans_layout_proto.md" \
    > "$OUT/ans_layout_log.txt" 2>&1
  grep "^|" "$OUT/ans_layout_proto.md"
fi
if want headline; then
  stamp "headline"
  cap "${T_HEADLINE:-230}" python3 experiments/headline.py --longest-budget "${LONGEST_S:-35}" \
    --out "$OUT/headline.md" 2>&1 | grep -v Warning | tail -20
fi
if want nzmem; then
  stamp "neuzip_memory"
  cap "${T_NZMEM:-100}" python3 experiments/neuzip_memory.py --out "$OUT/neuzip_memory.md" 2>&1 | tail -12
fi
if want tests; then
  stamp "pytest -m gpu"
  skip=(); want app && skip=(--ignore tests/test_app_gpu.py --ignore tests/test_checkpointing.py)
  cap "${T_TESTS:-200}" python3 -m pytest -q -m gpu tests "${skip[@]}" -p no:cacheprovider -p no:randomly -rf \
    --tb=short --durations=10 \
    > "$OUT/pytest_gpu.txt" 2>&1
  tail -25 "$OUT/pytest_gpu.txt"
fi
stamp "done"
