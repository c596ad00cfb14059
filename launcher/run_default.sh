#!/usr/bin/env bash
# The main job on the built-in default: 2 CPU processes, six tasks, the real offline model.
#   bash launcher/run_default.sh [--data.eval_max 50 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/icl-scale ] && PATH="$PWD/.venv/bin:$PATH"
export OMP_NUM_THREADS=1 ACCELERATE_USE_CPU=true TOKENIZERS_PARALLELISM=false
# `accelerate launch` with icl-scale's exit codes (2: bad input); --multi_gpu semantics with
# use_cpu: the only way to really get 2 CPU processes (--cpu starts one)
exec icl-scale launch --config_file launcher/cpu_2proc.yaml run --config launcher/default.yaml "$@"
