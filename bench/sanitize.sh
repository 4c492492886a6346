#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over one small call of every fi_cupy
# kernel and path: bench/sanitize_cases.py. On the GPU machine, from anywhere in the checkout:
#
#   bash bench/sanitize.sh                                      # the four tools over every case
#   SANITIZE_TOOLS=racecheck SANITIZE_WARM=0 bash bench/sanitize.sh   # one tool a call (10-minute limit)
#   SANITIZE_TOOLS=memcheck SANITIZE_CASES='decode_* softmax_ring' bash bench/sanitize.sh
#
# First a plain run of the cases (no tool): they must pass, and it fills the kernel cache
# (FI_CUPY_CACHE_DIR), so no NVRTC compile runs under a tool. Then one process a tool over the
# cases. Logs go to $OUT if set, else ./sanitize_logs: plain.log, <tool>.log and summary.txt (a row
# is added as each run ends). The table: tool, cases ok, kernel templates launched, errors (the sum
# of the tool's "ERROR SUMMARY: N errors" and racecheck's "RACECHECK SUMMARY: N hazards" lines),
# wall time. Exit status 1 if a tool reported anything, a run died or timed out, or a case failed;
# 2 if compute-sanitizer or the case list is missing.
#
# Environment knobs:
#   SANITIZE_TOOLS        tools, in order (default "memcheck racecheck synccheck initcheck")
#   SANITIZE_CASES        case names or globs (default: all; python bench/sanitize_cases.py --list)
#   SANITIZE_EXCLUDE      globs of cases to leave out
#   SANITIZE_PER_CASE=1   one process a case: slower, but a memcheck error (which destroys the CUDA
#                         context) cannot take the later cases down with it
#   SANITIZE_WARM=0       skip the plain run (kernel cache already warm)
#   SANITIZE_TIMEOUT      seconds a process may run (default 540)
#   SANITIZE_PRINT_LIMIT  errors printed a process (default 100)
#   SANITIZE_API_ERRORS   memcheck --report-api-errors (default no: see memcheck below)
#   SANITIZE_ARGS         more compute-sanitizer options for every tool, e.g. --racecheck-report=all
#   COMPUTE_SANITIZER     the binary (default: on PATH, else /usr/local/cuda*/bin/compute-sanitizer)
#   PYTHON                the interpreter (default python3)
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # each torch tensor its own cudaMalloc (sanitize_cases.py turns CuPy's pool off)
export FI_CUPY_CACHE_DIR="${FI_CUPY_CACHE_DIR:-/tmp/fi_cupy_cache}"
PY=${PYTHON:-python3}
LOGS=${OUT:-./sanitize_logs}
LIMIT=${SANITIZE_PRINT_LIMIT:-100}
TIMEOUT=${SANITIZE_TIMEOUT:-540}
mkdir -p "$LOGS"
SUMMARY="$LOGS/summary.txt"

read -r -a TOOLS <<< "${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}"
read -r -a SEL <<< "${SANITIZE_CASES:-}"  # read -a: globs stay words, never expanded against files
read -r -a EXCL <<< "${SANITIZE_EXCLUDE:-}"
for x in ${EXCL[@]+"${EXCL[@]}"}; do SEL+=(--exclude "$x"); done
read -r -a EXTRA <<< "${SANITIZE_ARGS:-}"

find_sanitizer() {
  command -v compute-sanitizer && return
  local c
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer; do
    if [ -x "$c" ]; then echo "$c"; return; fi
  done
}
SAN=${COMPUTE_SANITIZER:-$(find_sanitizer)}
if [ -z "$SAN" ] || [ ! -x "$SAN" ]; then
  echo "sanitize.sh: compute-sanitizer not found on PATH or under /usr/local/cuda*/bin; set COMPUTE_SANITIZER" >&2
  exit 2
fi
if ! LIST=$("$PY" bench/sanitize_cases.py --list ${SEL[@]+"${SEL[@]}"}); then
  echo "sanitize.sh: could not list the cases" >&2
  exit 2
fi
if [ -z "$LIST" ]; then
  echo "sanitize.sh: no case selected" >&2
  exit 2
fi
mapfile -t NAMES < <(cut -f1 <<< "$LIST")
HELP=$("$SAN" --help 2>&1 || true)
{
  echo "compute-sanitizer: $SAN ($("$SAN" --version 2>&1 | tail -1))"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  echo "cases: ${#NAMES[@]}; tools: ${TOOLS[*]}; logs: $LOGS; $(date -u +%FT%TZ)"
} | tee -a "$SUMMARY"

supports() { grep -q -- "--$1" <<< "$HELP"; }

# Options a tool runs with (decided here; SANITIZE_ARGS adds to them):
# - every tool: a nonzero exit on findings; a connection timeout above the default 10 s, which a
#   Python process importing CuPy and torch can take before CUDA starts.
# - memcheck: --padding puts 1 KB after every allocation, so an overrun lands there and is reported
#   rather than landing silently in the next allocation. No kernel allocates on the device heap
#   (--check-device-heap=no). API errors are off by default: CuPy and torch probe the driver with
#   calls that fail by design and handle the result; an API failure in fi_cupy raises in Python and
#   fails its case. No leak check: fi_cupy keeps per-process caches (scratch, staging) to the end.
# - racecheck: the default analysis report (one report a race, hazards counted in its summary);
#   --racecheck-report=all through SANITIZE_ARGS for every hazard.
# - synccheck: defaults (wgmma and cp.async.bulk checks are on by default).
# - initcheck: global memory, the default. --track-unused-memory is a flag without a value that is
#   off by default: not passed ("--track-unused-memory no" would run "no" as the program).
tool_args() {
  ARGS=(--tool="$1" --error-exitcode=1 --print-limit="$LIMIT" --launch-timeout=120)
  case $1 in
    memcheck)
      ARGS+=(--check-device-heap=no --report-api-errors="${SANITIZE_API_ERRORS:-no}")
      if supports padding; then ARGS+=(--padding=1024); fi ;;
    racecheck) ARGS+=(--racecheck-report=analysis) ;;
  esac
  ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})
}

# What reaches the console (everything goes to the log): failed and skipped cases, nonzero sanitizer
# summaries, templates no case launched, each process's verdict, and its first 30 sanitizer report
# titles ("========= Invalid __shared__ read ...") and Python errors.
ALWAYS='^case .*: (FAILED|skipped)|SUMMARY: [1-9]|^templates: .*not launched: [A-Za-z_0-9]+ [(]|^sanitize_cases:|^sticky'
CAPPED='^=+ [A-Z][a-z]|^[A-Za-z]*Error|^Traceback'

# run LOG COMMAND...: one process, output appended to LOG, the notable lines echoed; sets RC.
run() {
  local log=$1; shift
  echo "+ $*" >> "$log"
  timeout --kill-after=30 "$TIMEOUT" "$@" 2>&1 | tee -a "$log" |
    awk -v a="$ALWAYS" -v c="$CAPPED" '$0 ~ a {print; fflush(); next} $0 ~ c && n++ < 30 {print; fflush()}'
  RC=${PIPESTATUS[0]}
  echo "exit status $RC" >> "$log"
  if [ "$RC" = 124 ]; then echo "  timed out after ${TIMEOUT}s: $*"; fi
}

FAILED=0
printf '%-10s %-12s %-9s %-8s %-7s %s\n' tool cases kernels errors time status | tee -a "$SUMMARY"

# summarize NAME LOG RC_ALL SECONDS PROCESSES: one table row (and its verdict) from a log.
summarize() {
  local name=$1 log=$2 rc=$3 secs=$4 procs=$5 ok failed skipped covered total errors nsum status=OK
  ok=$(grep -cE '^case .*: ok' "$log")
  failed=$(grep -cE '^case .*: FAILED' "$log")
  skipped=$(grep -cE '^case .*: skipped' "$log")
  covered=$(grep -E '^kernel ' "$log" | awk '$2 != "?" {print $2}' | sort -u | wc -l)
  total=$(sed -nE 's|^templates: [0-9]+/([0-9]+) .*|\1|p' "$log" | head -1)
  errors=$(grep -oE '(ERROR SUMMARY: [0-9]+ error|RACECHECK SUMMARY: [0-9]+ hazard)' "$log" | awk '{s += $3} END {print s + 0}')
  nsum=$(grep -cE '(ERROR|RACECHECK) SUMMARY: [0-9]+' "$log")
  if [ "$name" = none ]; then
    errors=-
  elif [ "$nsum" -lt "$procs" ]; then
    status="FAIL(no summary)"  # the tool died before reporting: its count of 0 would mean nothing
  fi
  if [ "$errors" != - ] && [ "$errors" -gt 0 ]; then status="FAIL(errors)"; fi
  if [ "$failed" -gt 0 ] || [ $((ok + skipped)) -lt "${#NAMES[@]}" ]; then status="FAIL(cases)"; fi
  if [ "$rc" != 0 ] && [ "$status" = OK ]; then status="FAIL(exit $rc)"; fi
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="FAIL(timeout ${TIMEOUT}s)"; fi
  [ "$status" = OK ] || FAILED=1
  printf '%-10s %-12s %-9s %-8s %-7s %s\n' "$name" "$ok/${#NAMES[@]}" "$covered/${total:-?}" "$errors" \
    "${secs}s" "$status$([ "$skipped" -gt 0 ] && echo " ($skipped skipped)")" | tee -a "$SUMMARY"
}

if [ "${SANITIZE_WARM:-1}" != 0 ]; then
  log="$LOGS/plain.log"
  : > "$log"
  start=$SECONDS
  run "$log" "$PY" bench/sanitize_cases.py ${SEL[@]+"${SEL[@]}"}
  summarize none "$log" "$RC" $((SECONDS - start)) 1
fi

for tool in "${TOOLS[@]}"; do
  log="$LOGS/$tool.log"
  : > "$log"
  tool_args "$tool"
  start=$SECONDS
  worst=0
  if [ "${SANITIZE_PER_CASE:-0}" = 1 ]; then
    for name in "${NAMES[@]}"; do
      run "$log" "$SAN" "${ARGS[@]}" "$PY" bench/sanitize_cases.py "$name"
      [ "$RC" = 0 ] || worst=$RC
    done
    procs=${#NAMES[@]}
  else
    run "$log" "$SAN" "${ARGS[@]}" "$PY" bench/sanitize_cases.py ${SEL[@]+"${SEL[@]}"}
    worst=$RC
    procs=1
  fi
  summarize "$tool" "$log" "$worst" $((SECONDS - start)) "$procs"
done
exit $FAILED
