#!/usr/bin/env bash
# The main job on the built-in default: 2 CPU processes, six tasks, the real offline model.
#   bash launcher/run_default.sh [--data.eval_max 50 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 ACCELERATE_USE_CPU=true TOKENIZERS_PARALLELISM=false
exec accelerate launch --config_file launcher/cpu_2proc.yaml -m icl_scale run --config launcher/default.yaml "$@"
