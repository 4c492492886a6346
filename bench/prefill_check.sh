#!/usr/bin/env bash
# One device call for the prefill family: its tests, then its benchmark. Logs under $OUT.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export FI_CUPY_CACHE_DIR=${FI_CUPY_CACHE_DIR:-/tmp/fi_cupy_cache}
OUT=${OUT:-/tmp/fi_cupy_out}
mkdir -p "$OUT"
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -x -rs --durations=8 tests/test_prefill.py "$@" 2>&1 | tee "$OUT/prefill_tests.txt" | tail -40
[ -z "${SKIP_BENCH:-}" ] && timeout ${BENCH_TIMEOUT:-200} python3 bench/bench_prefill.py 2>&1 | tee "$OUT/bench_prefill.txt"
