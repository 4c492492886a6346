#!/usr/bin/env bash
# One device call for issue 21's host-cost table with FlashInfer in the same run: FlashInfer 0.7.2 from the
# carried bundle (.whl/, bench/flashinfer_bundle.sh) is installed and its modules for bench_host.py are
# JIT-built in the background while the fast-path tests run; then, with the CPUs quiet again,
# profile_small_host.py and bench_host.py. Logs: $OUT/tests.tgz, $OUT/bench.tgz, $OUT/prebuild.txt.
# Usage (repo root, carry .whl): bash bench/host_check.sh
#   env: TESTS (default "tests/test_fastpath.py tests/test_frameworks.py"), JOBS (pytest workers, 4), PREBUILD_S (300: wait at most this
#   long for the build; FlashInfer is left out of the benchmark if it did not finish), HOST_ARGS (--quick),
#   FI_SET (fi_prebuild's set, "host"; "plan" builds only the 4 modules of --only plan: the "host" set took
#   421 s on 2026-12-07, beside a suite), SUITE_ARGS (to gpu_suite.sh), PROFILE (profile_small_host.py; "" skips it),
#   PACK_AOT=1 (return the built modules, bench/flashinfer_aot.sh)
# The plan() table with the full suite in one call:
#   FI_SET=plan TESTS=tests SUITE_ARGS="--deselect tests/test_compile_all.py" JOBS=12 PROFILE= HOST_ARGS="--only plan" bash bench/host_check.sh
OUT=${OUT:-/tmp/fi_cupy_out}
mkdir -p "$OUT"
source bench/flashinfer_setup.sh > "$OUT/prebuild.txt" 2>&1
( MAX_JOBS=${MAX_JOBS:-16} fi_prebuild build ${FI_SET:-host} >> "$OUT/prebuild.txt" 2>&1 ) &
build=$!
OUT=$OUT/t SUITE_PATHS=${TESTS:-"tests/test_fastpath.py tests/test_frameworks.py"} SKIP_FUZZ=1 JOBS=${JOBS:-4} \
  bash bench/gpu_suite.sh && mv "$OUT/t/logs.tgz" "$OUT/tests.tgz"
waited=0
while kill -0 $build 2>/dev/null && [ $waited -lt ${PREBUILD_S:-300} ]; do sleep 5; waited=$((waited + 5)); done
kill -0 $build 2>/dev/null && { echo "prebuild still running after ${PREBUILD_S:-300}s: stopped"; pkill -P $build; kill $build; }
tail -3 "$OUT/prebuild.txt"
# PACK_AOT=1: the built modules come back as $OUT/fi_aot.tgz.part* (before the benchmark, so a call that runs out
# of time still returns them); here `cat fi_aot.tgz.part* > .whl/flashinfer_aot_sm90a.tgz` and later calls skip the build
[ -n "${PACK_AOT:-}" ] && grep -q "built or already cached" "$OUT/prebuild.txt" && OUT=$OUT bash bench/flashinfer_aot.sh
peers=torch
grep -q "built or already cached" "$OUT/prebuild.txt" && peers=flashinfer,torch
OUT=$OUT/b KEEP_PYTHONPATH=1 SKIP_SUITE=1 SKIP_FUZZ=1 BENCH_TAIL=80 BENCH_TIMEOUT=${BENCH_TIMEOUT:-300} \
  BENCHES="${PROFILE-profile_small_host.py;}bench_host.py ${HOST_ARGS:---quick} --peers $peers" bash bench/gpu_suite.sh \
  && mv "$OUT/b/logs.tgz" "$OUT/bench.tgz"
