# One GPU call for NeuZip (run from the repo root with .whl carried): the GPU tests, then the speed benchmark.
# Budget: ~4 minutes. Results: $OUT/neuzip_speed.md, $OUT/pytest_gpu.txt and experiments/results/neuzip_speed.md.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/neuzip_out}; mkdir -p "$OUT"; export OUT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 -m pytest -q -m gpu tests/kernels/test_ans.py tests/quant/test_neuzip*.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25
timeout 130 python3 experiments/neuzip_speed.py 2>&1 | tail -60
cp experiments/results/neuzip_speed.md "$OUT/neuzip_speed_repo.md" 2>/dev/null || true
