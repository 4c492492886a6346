#!/usr/bin/env bash
# One device call for issue 7: the example's tests (against transformers), a short run of the CLI, then
# the end-to-end benchmark. Logs go to $OUT (or /tmp/fi_cupy_out). Usage: bash bench/e2e_check.sh
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export FI_CUPY_CACHE_DIR=${FI_CUPY_CACHE_DIR:-/tmp/fi_cupy_cache}
OUT=${OUT:-/tmp/fi_cupy_out}
mkdir -p "$OUT"
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -rs -s tests/test_llama_example.py tests/test_llama_example_cpu.py \
  -p no:cacheprovider 2>&1 | tee "$OUT/e2e_tests.txt" | tail -40
timeout 120 python3 examples/llama_decode.py --random tiny --prompt "1 2 3 4" --prompt "hello world" \
  --max-new-tokens 24 --temperature 0.7 --top-p 0.9 --top-k 40 2>&1 | tee "$OUT/cli.txt" | tail -20
[ -n "${SKIP_BENCH:-}" ] || timeout ${BENCH_TIMEOUT:-400} python3 bench/bench_e2e.py ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/bench_e2e.txt"
