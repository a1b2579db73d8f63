#!/usr/bin/env bash
# Smoke test of the project on the NEWEST releases of its dependencies (no constraints.txt), in a second fresh venv:
#   1. pip install -e ".[dev]" with every dependency upgraded to its newest release that pyproject.toml allows
#   2. upstream alone, outside the checkout: torch, transformers (a model through from_pretrained), lightning, hydra
#   3. ours, from the repository root: the install regression test (HF `kernels` + hub kernels + our kernels) and one
#      `trainer.fast_dev_run` through the app
# Exit status: 1 only when the break is ours (steps 1-2 pass, step 3 fails); an upstream break (an install that does not
# resolve, or upstream packages failing on their own) is reported, not failed. A break of ours is mended in the code
# or by an upper bound in pyproject.toml.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${NEWEST_VENV:-/tmp/memfit-newest-venv}
rm -rf "$venv"
say() { printf '[newest] %s\n' "$*"; }
python3 -m venv "$venv" || { say "UPSTREAM: could not create a virtual environment"; exit 0; }
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1
if ! "$py" -m pip install -q torch==2.13.0 >/dev/null 2>&1 && ! "$py" -m pip install -q "torch>=2.5,<2.15"; then
  say "UPSTREAM: torch did not install"; exit 0
fi
# torch stays at the build just installed (the newest CUDA wheels are several GB); everything else goes to its newest
echo "torch==$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')" > "$venv/keep-torch.txt"
if ! "$py" -m pip install -q --upgrade --upgrade-strategy eager -c "$venv/keep-torch.txt" -e ".[dev]" \
    >"$venv/install.log" 2>"$venv/install.err"; then
  say "UPSTREAM: the newest releases do not install together:"; tail -5 "$venv/install.err"; exit 0
fi
say "versions: $("$py" -m pip freeze 2>/dev/null | grep -iE '^(torch|triton|transformers|kernels|lightning|hydra-core|omegaconf|datasets|wandb|peft|huggingface.hub|tokenizers|safetensors|numpy)==' | tr '\n' ' ')"
upstream=$(cd /tmp && HF_HUB_OFFLINE=1 "$py" - 2>&1 <<'PY'
import tempfile
import hydra, lightning, torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=32))
with tempfile.TemporaryDirectory() as d:
    m.save_pretrained(d)
    AutoModelForCausalLM.from_pretrained(d)
print("upstream ok")
PY
)
if [[ "$upstream" != *"upstream ok"* ]]; then
  say "UPSTREAM: the newest releases fail on their own (not our break):"; echo "$upstream" | tail -5; exit 0
fi
fail=0
if ! out=$(HF_HUB_OFFLINE=1 "$py" -m pytest -q -p no:randomly tests/test_install.py 2>&1); then
  say "OURS: tests/test_install.py fails on the newest releases:"; echo "$out" | tail -15; fail=1
fi
run_dir=$(mktemp -d)
if ! out=$(HF_HUB_OFFLINE=1 WANDB_MODE=offline "$py" -m memfit.train model.pretrained=false model.arch.hidden_size=32 \
    model.arch.intermediate_size=64 model.arch.num_hidden_layers=1 model.arch.num_attention_heads=2 \
    model.arch.num_key_value_heads=1 data.n_train=16 data.n_val=4 data.n_test=4 trainer.fast_dev_run=true \
    trainer.accelerator=cpu logger=none eval.before=false print_summary=false "hydra.run.dir=$run_dir" \
    "paths.cache_dir=$run_dir/cache" 2>&1); then
  say "OURS: the app's fast_dev_run fails on the newest releases:"; echo "$out" | tail -15; fail=1
fi
rm -rf "$run_dir"
((fail)) || say "ok: the install test and the app's fast_dev_run pass on the newest releases"
exit $fail
