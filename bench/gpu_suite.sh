#!/usr/bin/env bash
# One device call that verifies a commit: the full GPU test suite, then the fuzz suite over several seeds.
# Logs to $OUT (tests.txt, fuzz_<seed>.txt, env.txt). A kernel cache built ahead of time with the device's
# NVRTC version can be passed as KCACHE=<tar.gz of a .kcache folder> (saves compile time on the device).
# Usage (repo root): bash bench/gpu_suite.sh    env: FUZZ_SEEDS ("0 1 2"), FUZZ_CASES (7000), JOBS (14),
#   SUITE_ARGS (extra pytest args for the suite), SKIP_SUITE=1, SKIP_FUZZ=1.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/fi_cupy_out}
mkdir -p "$OUT"
if [ -n "${KCACHE:-}" ] && [ -f "$KCACHE" ]; then tar xzf "$KCACHE" && export FI_CUPY_CACHE_DIR=$PWD/.kcache; fi
export FI_CUPY_CACHE_DIR=${FI_CUPY_CACHE_DIR:-/tmp/fi_cupy_cache}  # one cache for every xdist worker
{ date -u; git log -1 --format='%H %s' 2>/dev/null; nvidia-smi --query-gpu=name,driver_version --format=csv;
  python3 -m fi_cupy; } > "$OUT/env.txt" 2>&1
if [ -z "${SKIP_SUITE:-}" ]; then
  timeout ${SUITE_TIMEOUT:-300} python3 -m pytest -q -rs -n ${JOBS:-14} --durations=10 tests ${SUITE_ARGS:-} \
    > "$OUT/tests.txt" 2>&1
  tail -15 "$OUT/tests.txt"
fi
if [ -z "${SKIP_FUZZ:-}" ]; then
  for s in ${FUZZ_SEEDS:-0 1 2}; do
    FI_CUPY_FUZZ_SEED=$s FI_CUPY_FUZZ_CASES=${FUZZ_CASES:-7000} timeout ${FUZZ_TIMEOUT:-150} \
      python3 -m pytest -q -rs -n $(( ${JOBS:-14} + 1 )) tests/test_fuzz.py > "$OUT/fuzz_$s.txt" 2>&1
    echo "fuzz seed $s: $(tail -1 "$OUT/fuzz_$s.txt")"
  done
fi
