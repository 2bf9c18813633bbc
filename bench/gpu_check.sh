#!/usr/bin/env bash
# The GPU check of docs/scaling.md: one prepared run (< 9 minutes) on a machine with one CUDA GPU.
# bf16 training throughput and MFU of a ~1B-parameter K2-shaped model, peak GPU memory with and without the
# activation-memory switches (selective recomputation, FP8 activation storage, activation offload), and the compiled
# decode step (CUDA graphs) against the eager path: tokens/s, compile time, greedy tokens shared.
#   bash bench/gpu_check.sh                 # results in $OUT (or bench_out/) as gpu_check.json, tables on stdout
#   bash bench/gpu_check.sh --parts decode  # only the decode check (runs first in a full check)
# Without a CUDA GPU it runs the same code path on CPU with the tiny preset and says that nothing was measured.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT_DIR="${OUT:-bench_out}"
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    timeout 540 "$PY" bench/gpu_check.py --out "$OUT_DIR" "$@"
else
    echo "no CUDA GPU here: CPU smoke run of the same code path (tiny preset); GPU figures NOT measured" >&2
    timeout 300 "$PY" bench/gpu_check.py --cpu-smoke --out "$OUT_DIR" "$@"
fi
