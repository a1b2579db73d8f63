export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -m gpu tests/test_ans.py tests/test_neuzip.py -p no:cacheprovider 2>&1 | tail -15
timeout 230 python3 experiments/neuzip_speed.py --sizes 1,8,128,512,1024 --spl 512,2048 2>&1 | tail -40
