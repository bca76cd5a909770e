#!/usr/bin/env bash
# The GPU check in one call (benchmarks/gpu_check.py: one table, under 8 minutes on one GPU), the CUDA-only tests
# included; the output also goes to $OUT/gpu_check.txt (OUT default: logs). Extra arguments go to gpu_check.py:
#   bash benchmarks/gpu_check.sh                      # cuda where available
#   bash benchmarks/gpu_check.sh --budget-s 300       # a shorter budget: later sections are skipped
#   bash benchmarks/gpu_check.sh --device cpu --quick # smoke test on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python; fi)}
dest=${OUT:-logs}
mkdir -p "$dest"
"$PYTHON" benchmarks/gpu_check.py --pytest "$@" 2>&1 | tee "$dest/gpu_check.txt"
exit "${PIPESTATUS[0]}"
