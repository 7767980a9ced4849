#!/usr/bin/env bash
# GPU check of the runners, one command: serial, processes and ray on the GPU with
# tiles_per_device 1 and 4 (metrics must equal serial's), then eval and predict of the GPU-trained
# run on the CPU; prints one table. About 5 minutes on one GPU; without a GPU it runs the same
# steps on the CPU. Run from anywhere: PYTHON=/path/to/python benchmarks/gpu_check.sh [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
