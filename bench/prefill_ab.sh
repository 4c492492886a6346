#!/usr/bin/env bash
# A/B timing of prefill variants in one device call. Each argument is "label=rev1:path1,rev2:path2,...":
# the working tree with those files taken from those revisions, timed, then restored with git checkout
# (so the tree must be committed).
# Example: bench/prefill_ab.sh "old=HEAD~1:cuda_src/prefill_sm90.cu" "new="
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export FI_CUPY_CACHE_DIR=${FI_CUPY_CACHE_DIR:-/tmp/fi_cupy_cache}
OUT=${OUT:-/tmp/fi_cupy_out}
mkdir -p "$OUT"
for spec in "$@"; do
  label=${spec%%=*}; files=${spec#*=}
  IFS=, read -ra parts <<< "$files"
  for p in "${parts[@]}"; do [ -n "$p" ] && git show "${p%%:*}:${p#*:}" > "${p#*:}"; done
  echo "=== $label ($files)"
  timeout ${BENCH_TIMEOUT:-150} python3 bench/bench_prefill.py ${BENCH_ARGS:-} 2>&1 | grep -v Warning | tail -7 | tee "$OUT/ab_$label.txt"
  git checkout -q -- .
done
