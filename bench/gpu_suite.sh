#!/usr/bin/env bash
# One device call that verifies a commit: the full GPU test suite, the suite again with torch and JAX
# blocked (tests/block_imports: every kernel test must run with CuPy alone), the fuzz suite over several
# seeds, then benchmarks. Logs go to $OUT/logs/ and come back as $OUT/logs.tgz (the device returns at most
# 8 files); a summary goes to stdout. A kernel cache built ahead of time with the device's NVRTC version can
# be passed as KCACHE=<tar.gz of a .kcache folder> (saves compile time on the device).
# Usage (repo root): bash bench/gpu_suite.sh
#   env: FUZZ_SEEDS ("0 1 2"), FUZZ_CASES (7000), JOBS (14), SUITE_ARGS (extra pytest args for the suite),
#   SUITE_PATHS (what the suite runs, default tests; e.g. "tests/test_variant.py tests/test_variant_cpu.py"),
#   SKIP_SUITE=1, NO_TORCH_SUITE=1 (also run the suite with torch/JAX blocked), SKIP_FUZZ=1,
#   BENCHES ("bench_host.py --quick;bench_cascade.py": ';'-separated scripts under bench/ with arguments).
set -o pipefail
export PYTHONPATH=$PWD${KEEP_PYTHONPATH:+${PYTHONPATH:+:$PYTHONPATH}} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # KEEP_PYTHONPATH=1: the caller's after ours (FlashInfer for benches)
OUT=${OUT:-/tmp/fi_cupy_out}
LOGS=$OUT/logs
mkdir -p "$LOGS"
if [ -n "${KCACHE:-}" ] && [ -f "$KCACHE" ]; then tar xzf "$KCACHE" && export FI_CUPY_CACHE_DIR=$PWD/.kcache; fi
export FI_CUPY_CACHE_DIR=${FI_CUPY_CACHE_DIR:-/tmp/fi_cupy_cache}  # one cache for every xdist worker
{ date -u; git log -1 --format='%H %s' 2>/dev/null; nvidia-smi --query-gpu=name,driver_version --format=csv;
  python3 -m fi_cupy; } > "$LOGS/env.txt" 2>&1
head -4 "$LOGS/env.txt"

suite() {  # suite <log name> [env assignments...]: the whole test suite, its last lines to stdout
  local log=$1; shift
  env "$@" timeout ${SUITE_TIMEOUT:-300} python3 -m pytest -q -rs -n ${JOBS:-14} --durations=10 ${SUITE_PATHS:-tests} \
    ${SUITE_ARGS:-} > "$LOGS/$log" 2>&1
  echo "== $log"; grep -E "^(FAILED|ERROR)" "$LOGS/$log" | head -30; tail -1 "$LOGS/$log"
}
[ -z "${SKIP_SUITE:-}" ] && suite tests.txt
[ -n "${NO_TORCH_SUITE:-}" ] && suite tests_no_torch.txt PYTHONPATH="$PWD/tests/block_imports:$PWD" \
  FI_CUPY_BLOCK_IMPORTS=torch,jax,transformers
if [ -z "${SKIP_FUZZ:-}" ]; then
  for s in ${FUZZ_SEEDS:-0 1 2}; do
    FI_CUPY_FUZZ_SEED=$s FI_CUPY_FUZZ_CASES=${FUZZ_CASES:-7000} timeout ${FUZZ_TIMEOUT:-150} \
      python3 -m pytest -q -rs -n $(( ${JOBS:-14} + 1 )) tests/test_fuzz.py > "$LOGS/fuzz_$s.txt" 2>&1
    echo "fuzz seed $s: $(tail -1 "$LOGS/fuzz_$s.txt")"
  done
fi
IFS=';' read -ra benches <<< "${BENCHES:-}"
for b in "${benches[@]}"; do
  read -ra argv <<< "$b"
  [ ${#argv[@]} -eq 0 ] && continue
  name=$(basename "${argv[0]}" .py)
  echo "== $b"
  OUT=$LOGS timeout ${BENCH_TIMEOUT:-240} python3 "bench/${argv[0]}" "${argv[@]:1}" > "$LOGS/$name.txt" 2>&1
  tail -${BENCH_TAIL:-25} "$LOGS/$name.txt"
done
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
