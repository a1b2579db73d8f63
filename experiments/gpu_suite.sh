#!/usr/bin/env bash
# One single-GPU device call: every `-m gpu` test, the headline experiment, the NeuZip memory table and the NeuZip
# speed benchmark, each under its own time cap so that one slow stage cannot eat the others (every script writes its
# table as it goes, so a capped stage keeps what it measured).
# Run from the repo root with the wheel folders carried (.whl: hydra/omegaconf/datasets; .whl-bnb: bitsandbytes).
# Results land in $OUT (and experiments/results/ on that machine).
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TQDM_DISABLE=1 TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-/tmp/gpu_suite}; mkdir -p "$OUT"; export OUT
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .whl-bnb/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
stamp "pytest -m gpu"
timeout "${T_TESTS:-140}" python3 -m pytest -q -m gpu tests -p no:cacheprovider --durations=10 2>&1 \
  | tee "$OUT/pytest_gpu.txt" | tail -25
stamp "headline"
timeout "${T_HEADLINE:-230}" python3 experiments/headline.py --longest-budget "${LONGEST_S:-35}" \
  --out "$OUT/headline.md" 2>&1 | grep -v Warning | tail -20
stamp "neuzip_memory"
timeout "${T_NZMEM:-90}" python3 experiments/neuzip_memory.py --out "$OUT/neuzip_memory.md" 2>&1 | tail -12
stamp "neuzip_speed"
timeout "${T_NEUZIP:-90}" python3 experiments/neuzip_speed.py --sweep-sizes 128 --spl 512,2048 \
  --shapes 128x4,256x4,256x8 --out "$OUT/neuzip_speed.md" 2>&1 | tail -40
stamp "done"
