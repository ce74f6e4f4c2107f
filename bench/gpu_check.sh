#!/usr/bin/env bash
# The trainer's figures on one NVIDIA GPU, on a machine with torch but no network (bench/gpu_check.py says
# which). Installs only from the wheels beside it (bench/wheels, made by bench/gpu_wheels.sh on a machine with
# network; under 64 MiB), then runs the check in under 5 minutes:
#
#   bench/gpu_wheels.sh --cuda 128      # here: download and prune the wheels (bitsandbytes: one CUDA library)
#   bench/gpu_check.sh                  # there: install them, print one line per figure
#   bench/gpu_check.sh --dry-run        # anywhere: tiny shapes on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ -f bench/wheels/requirements.txt ]; then
  "$py" -m pip install -q --no-index --find-links bench/wheels -r bench/wheels/requirements.txt
fi
export PYTHONPATH="operator:trainer-image${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 300 "$py" bench/gpu_check.py "$@"
