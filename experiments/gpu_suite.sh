#!/usr/bin/env bash
# One single-GPU device call: every `-m gpu` test, the NeuZip speed benchmark and the headline experiment.
# Run from the repo root with the wheel folders carried (.whl: hydra/omegaconf/datasets/peers; .whl-bnb: bitsandbytes).
# Results land in $OUT (and experiments/results/ on that machine).
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/gpu_suite}; mkdir -p "$OUT"; export OUT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .whl-bnb/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout ${T_TESTS:-170} python3 -m pytest -q -m gpu tests -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25
timeout ${T_NEUZIP:-130} python3 experiments/neuzip_speed.py 2>&1 | tail -40
cp experiments/results/neuzip_speed.md "$OUT/neuzip_speed.md" 2>/dev/null || true
timeout ${T_HEADLINE:-280} python3 experiments/headline.py --out "$OUT/headline.md" 2>&1 | tail -30
