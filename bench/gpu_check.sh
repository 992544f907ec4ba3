#!/usr/bin/env bash
# One-shot GPU check of the SIA pipeline and the RealNet trainer (see bench/gpu_check.py):
# sampling speed vs the bf16 bound, host syncs per step, sia-gen through Ray vs the bare
# loop, realnet-train and sia-train-diffusion on CUDA, CPU vs GPU samples. At most 8 minutes
# on one H100; refuses to start without CUDA (exit 2). Writes
# bench/results/gpu_check-<device>.json and .md.
#
#   bash bench/gpu_check.sh                 # PYTHON=... picks the interpreter
#   bash bench/gpu_check.sh --phases sampling,syncs
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python3
fi

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check.sh: error: no CUDA device is visible to $py (torch.cuda.is_available() is False)" >&2
  exit 2
fi

# gpu_check.py starts no phase after 450 s; this is the hard stop at 8 minutes.
exec timeout --signal=INT --kill-after=10 470 "$py" bench/gpu_check.py --device cuda "$@"
