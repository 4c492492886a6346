#!/usr/bin/env bash
# One call on the GPU machine: environment report, precompile for this GPU, the whole test suite (GPU
# tests run for real there), then the decode benchmark. Logs go to $OUT (or /tmp/fi_cupy_out).
# Usage (from the repo root): bash bench/device_check.sh [pytest args...]
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export FI_CUPY_CACHE_DIR=${FI_CUPY_CACHE_DIR:-/tmp/fi_cupy_cache}
OUT=${OUT:-/tmp/fi_cupy_out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; python3 -m fi_cupy; } \
  2>&1 | tee "$OUT/env.txt"
python3 -m fi_cupy precompile 2>&1 | tail -1
timeout ${TEST_TIMEOUT:-330} python3 -m pytest -q -rs --durations=15 tests "$@" 2>&1 | tee "$OUT/tests.txt" | tail -60
python3 bench/profile_host.py 2>&1 | tee "$OUT/profile_host.txt" | head -60
# BENCHES: the benchmark scripts to run (default: decode); BENCH_ARGS go to each.
if [ -z "${SKIP_BENCH:-}" ]; then
  for b in ${BENCHES:-bench_decode}; do
    timeout ${BENCH_TIMEOUT:-200} python3 bench/$b.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/$b.txt"
  done
fi
