#!/usr/bin/env bash
# A/B timing of variants in one device call. Each argument is "label=DIR": the files under DIR
# (paths relative to the repository root) are copied over the tree, the benchmark ($BENCH, default
# the prefill benchmark; its last $TAIL lines kept) runs, and the tree's own files are put back. An
# empty DIR times the tree as it is. Build DIRs locally with `git show REV:PATH > DIR/PATH` (keep
# them out of git; pass them to the device with carry).
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export FI_CUPY_CACHE_DIR=${FI_CUPY_CACHE_DIR:-/tmp/fi_cupy_cache}
OUT=${OUT:-/tmp/fi_cupy_out}
mkdir -p "$OUT"
backup=$(mktemp -d)
for spec in "$@"; do
  label=${spec%%=*}; dir=${spec#*=}
  files=()
  [ -n "$dir" ] && mapfile -t files < <(cd "$dir" && find . -type f | sed 's|^\./||')
  for f in "${files[@]}"; do mkdir -p "$backup/$(dirname "$f")"; cp "$f" "$backup/$f"; cp "$dir/$f" "$f"; done
  echo "=== $label (${files[*]})"
  timeout ${BENCH_TIMEOUT:-150} ${BENCH:-python3 bench/bench_prefill.py} 2>&1 | grep -v Warning | tail -${TAIL:-7} | tee "$OUT/ab_$label.txt"
  for f in "${files[@]}"; do cp "$backup/$f" "$f"; done
done
