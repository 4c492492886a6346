#!/usr/bin/env bash
# One device call for custom-variant work (issue 25): the variant GPU and CPU tests, then bench/bench_jit.py.
# Logs under $OUT (or /tmp/fi_cupy_out). Usage (repo root): bash bench/variant_check.sh [pytest args...]
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FI_CUPY_CACHE_DIR=${FI_CUPY_CACHE_DIR:-/tmp/fi_cupy_cache}
OUT=${OUT:-/tmp/fi_cupy_out}
mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } | tee "$OUT/env.txt"
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -rs -n ${JOBS:-14} tests/test_variant.py tests/test_variant_cpu.py "$@" \
  > "$OUT/variant_tests.txt" 2>&1
grep -E "^(FAILED|ERROR)" "$OUT/variant_tests.txt" | head -30; tail -1 "$OUT/variant_tests.txt"
[ -n "${SKIP_BENCH:-}" ] || timeout ${BENCH_TIMEOUT:-300} python3 bench/bench_jit.py > "$OUT/bench_jit.txt" 2>&1
tail -${BENCH_TAIL:-40} "$OUT/bench_jit.txt"
