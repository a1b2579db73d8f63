# Source on the lent GPU machine (from the repository root) before any project command:
#   source experiments/device_env.sh
# Installs the carried wheels (.whl: hydra-core, omegaconf, datasets, ...; .whl-bnb, .whl-peers when carried) into
# /tmp/site and makes `memfit` importable without a build (the image has no network for pip's build isolation):
# /tmp/site/memfit links to framework/, whose __init__ finds kernels/ beside it as `memfit.kernels`.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TQDM_DISABLE=1 TRANSFORMERS_VERBOSITY=error
_wheels=(.whl/*.whl)
for _d in .whl-bnb .whl-peers; do [[ -d $_d ]] && _wheels+=("$_d"/*.whl); done
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${_wheels[@]}"
ln -sfn "$PWD/framework" /tmp/site/memfit
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L
python3 -c "import torch, triton, transformers, lightning, memfit.kernels.cce; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
