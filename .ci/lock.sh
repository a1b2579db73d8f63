#!/usr/bin/env bash
# Regenerate constraints.txt from the managed .venv after the suite passed in it (./launch.sh --test).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${MEMFIT_PYTHON:-.venv/bin/python}
{
  echo "# Versions known to pass the test suite ($("$py" -c 'import sys, torch, triton; v = sys.version_info; print(f"python {v[0]}.{v[1]}, torch {torch.__version__}, triton {triton.__version__}")')), installed by"
  echo "# ./launch.sh as  pip install -c constraints.txt -e '.[dev]'  so the README's commands keep working when upstream"
  echo "# releases. pyproject.toml keeps the honest ranges; CI also smoke-tests the newest releases (.ci/newest.sh)."
  echo "# Regenerate after a green suite: .ci/lock.sh"
  "$py" -m pip freeze --exclude-editable 2>/dev/null | grep -vE '^(#|-e |memfit)' | sed 's/+cpu$//'
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
