#!/usr/bin/env bash
# The one launcher.
#   ./launch.sh [hydra overrides]                 train locally (sets up .venv on first use)
#   ./launch.sh --test [pytest args]              run the test suite (same set-up)
#   ./launch.sh --module memfit.transfer [overrides]   run another entry point
#   ./launch.sh --slurm --nodes N --gpus-per-node G [--partition P] [--time HH:MM:SS] [--cpus-per-task C]
#               [--mem M] [--account A] [--job-name NAME] [--tasks-per-node T] [--dry-run] [hydra overrides]
#       writes logs/<name>-<stamp>.sbatch (one task per GPU, or T CPU tasks; srun; requeue on preemption/timeout),
#       submits it and prints the job id; the run directory is logs/<name>-<jobid>/
# Environment: MEMFIT_PYTHON=/path/to/python uses your own environment instead of .venv;
#              MEMFIT_LOGS=DIR puts SLURM scripts and run directories (DIR/<name>-<jobid>/) there instead of logs/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
LOGS="${MEMFIT_LOGS:-$ROOT/logs}"   # SLURM scripts and run directories <name>-<jobid>/

log() { printf '[launch] %s\n' "$*" >&2; }

ensure_env() {
  if [[ -n "${MEMFIT_PYTHON:-}" ]]; then PY="$MEMFIT_PYTHON"; return; fi
  local venv="$ROOT/.venv" stamp
  PY="$venv/bin/python"
  # the locked set (constraints.txt: versions known to pass the suite) and the project's ranges decide the install
  stamp="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
  if [[ -x "$PY" && -f "$venv/.installed" && "$(cat "$venv/.installed")" == "$stamp" ]]; then return; fi
  if [[ ! -x "$PY" ]]; then
    log "creating virtual environment in .venv"
    python3 -m venv "$venv"
  fi
  "$PY" -m pip install -q --upgrade pip >/dev/null
  if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      log "installing torch (CUDA build, locked version)"
    else
      log "installing torch (locked version; a CPU build where one is available)"
    fi
    "$PY" -m pip install -q -c constraints.txt torch
  fi
  log "installing the project with the locked versions (pip install -c constraints.txt -e '.[dev]')"
  "$PY" -m pip install -q -c constraints.txt -e ".[dev]"
  echo "$stamp" > "$venv/.installed"
}

slurm_script() {
  # args: nodes gpus partition time cpus mem account name tasks overrides...
  local nodes=$1 gpus=$2 partition=$3 time=$4 cpus=$5 mem=$6 account=$7 name=$8 tasks=$9
  shift 9
  [[ -z "$tasks" ]] && tasks=$(( gpus > 0 ? gpus : 1 ))
  local accel="cpu"
  (( gpus > 0 )) && accel="gpu"
  local overrides="" trainer="trainer=ddp"
  for a in "$@"; do
    overrides+=" $(printf '%q' "$a")"
    [[ "$a" == trainer=* ]] && trainer=""   # the user's trainer=fsdp (or other) replaces the ddp default
  done
  cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=${name}
#SBATCH --nodes=${nodes}
#SBATCH --ntasks-per-node=${tasks}
#SBATCH --cpus-per-task=${cpus}
#SBATCH --time=${time}
#SBATCH --output=${LOGS}/%x-%j/slurm-%j.out
#SBATCH --requeue
#SBATCH --signal=SIGUSR1@120
#SBATCH --open-mode=append
EOF
  (( gpus > 0 )) && echo "#SBATCH --gpus-per-node=${gpus}"
  [[ -n "$partition" ]] && echo "#SBATCH --partition=${partition}"
  [[ -n "$mem" ]] && echo "#SBATCH --mem=${mem}"
  [[ -n "$account" ]] && echo "#SBATCH --account=${account}"
  cat <<EOF

# One task per GPU; Lightning reads SLURM_* (rank, world size, MASTER_ADDR from the node list) through its SLURM
# environment. On SIGUSR1 (sent 120 s before the time limit) or SIGTERM (preemption, scancel) every rank checkpoints
# at the next step boundary and rank 0 requeues the job (framework/parallel/slurm.py); the requeued job keeps its
# id, so it finds hpc_ckpt_<n>.ckpt in the same run directory and resumes from it.
set -euo pipefail
cd ${ROOT}
# the tasks handle USR1/TERM (checkpoint + requeue); the batch shell must survive them (bash would exit on USR1)
trap 'echo "[launch] batch shell: signal passed to the tasks"' USR1 TERM
export MASTER_PORT=\${MASTER_PORT:-\$(( 20000 + SLURM_JOB_ID % 20000 ))}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=\${SLURM_CPUS_PER_TASK:-1}
RUN_DIR=${LOGS}/\${SLURM_JOB_NAME}-\${SLURM_JOB_ID}
mkdir -p "\$RUN_DIR"
echo "[launch] job \${SLURM_JOB_ID} restart \${SLURM_RESTART_COUNT:-0} on \${SLURM_JOB_NODELIST}: run dir \$RUN_DIR"
srun --kill-on-bad-exit=1 ${PY} -m memfit.train ${trainer} trainer.accelerator=${accel} \\
  trainer.devices=${tasks} trainer.num_nodes=${nodes} hydra.run.dir="\$RUN_DIR" paths.output_dir="\$RUN_DIR"${overrides}
EOF
}

mode=train
module=memfit.train
nodes=1 gpus=0 partition="" time="04:00:00" cpus=4 mem="" account="" name="memfit" tasks="" dry=0
args=()
while (($#)); do
  case "$1" in
    --test) mode=test; shift; args=("$@"); break ;;
    --slurm) mode=slurm; shift ;;
    --module) module=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --gpus-per-node) gpus=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --time) time=$2; shift 2 ;;
    --cpus-per-task) cpus=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --account) account=$2; shift 2 ;;
    --job-name) name=$2; shift 2 ;;
    --tasks-per-node) tasks=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    --*) echo "launch.sh: unknown option $1 (see ./launch.sh --help)" >&2; exit 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || { echo "launch.sh: --nodes must be a positive integer, got '$nodes'" >&2; exit 2; }
[[ "$gpus" =~ ^[0-9]+$ ]] || { echo "launch.sh: --gpus-per-node must be an integer, got '$gpus'" >&2; exit 2; }
[[ -z "$tasks" || "$tasks" =~ ^[1-9][0-9]*$ ]] || { echo "launch.sh: --tasks-per-node must be a positive integer, got '$tasks'" >&2; exit 2; }
if [[ -n "$tasks" ]] && (( gpus > 0 && tasks != gpus )); then
  echo "launch.sh: --tasks-per-node ($tasks) must equal --gpus-per-node ($gpus): one task per GPU" >&2; exit 2
fi

case "$mode" in
  test)
    ensure_env
    exec "$PY" -m pytest "${args[@]+"${args[@]}"}" ;;
  train)
    ensure_env
    exec "$PY" -m "$module" "${args[@]+"${args[@]}"}" ;;
  slurm)
    if ((dry)); then  # print the script only: nothing is written or submitted
      PY="${MEMFIT_PYTHON:-$ROOT/.venv/bin/python}"
      [[ "$LOGS" = /* ]] || LOGS="$ROOT/$LOGS"
      log "dry run: the batch script below is not written or submitted"
      slurm_script "$nodes" "$gpus" "$partition" "$time" "$cpus" "$mem" "$account" "$name" "$tasks" \
        "${args[@]+"${args[@]}"}"
      exit 0
    fi
    ensure_env
    mkdir -p "$LOGS" && LOGS="$(cd "$LOGS" && pwd)"
    script="${LOGS}/${name}-$(date +%Y%m%d-%H%M%S)-$$.sbatch"
    slurm_script "$nodes" "$gpus" "$partition" "$time" "$cpus" "$mem" "$account" "$name" "$tasks" \
      "${args[@]+"${args[@]}"}" > "$script"
    chmod +x "$script"
    command -v sbatch >/dev/null || { echo "launch.sh: sbatch not found (is this a SLURM login node?)" >&2; exit 1; }
    log "submitting $script"
    # held until logs/<name>-<id>/ exists: slurmd does not create the directory of --output itself
    job=$(sbatch --parsable --hold "$script")
    job=${job%%;*}
    mkdir -p "${LOGS}/${name}-${job}"
    scontrol release "$job"
    log "submitted job $job; logs in ${LOGS}/${name}-${job}/"
    echo "$job" ;;
esac
