#!/usr/bin/env bash
# The default test suite N times in a row with the machine held near a 1-minute load of TARGET (default 8): a
# controller adds a busy loop while the load is under TARGET - 0.5 and removes one while it is over TARGET + 0.5
# (other work on the machine counts towards the load too). One line per run goes to OUT/results.txt.
#
#   benchmarks/suite_under_load.sh [RUNS=10] [OUT=/tmp/suite_under_load] [TARGET=8]
#
# Run it from a checkout with its .venv installed as the README says. It stops its busy loops by their PIDs.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
out=${2:-/tmp/suite_under_load}
target=${3:-8}
mkdir -p "$out"
for i in $(seq 1 "$runs"); do
  (
    pids=()
    trap 'kill "${pids[@]}" 2>/dev/null; exit 0' TERM
    while true; do
      load=$(cut -d' ' -f1 /proc/loadavg)
      echo "$(date +%T) $load loops=${#pids[@]}" >> "$out/load_$i.txt"
      if awk "BEGIN{exit !($load < $target - 0.5)}"; then
        python3 -c "while True: pass" & pids+=($!)
      elif awk "BEGIN{exit !($load > $target + 0.5)}" && [ ${#pids[@]} -gt 0 ]; then
        kill "${pids[-1]}"; unset 'pids[-1]'
      fi
      sleep 10  # the load generator's own pace; nothing here is timed
    done
  ) & controller=$!
  start=$(date +%s)
  .venv/bin/python -m pytest -q -p no:cacheprovider > "$out/run_$i.log" 2>&1; rc=$?
  end=$(date +%s)
  kill -TERM "$controller"; wait "$controller" 2>/dev/null
  median=$(awk '{print $2}' "$out/load_$i.txt" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  echo "run $i rc=$rc seconds=$((end - start)) median_load1=$median $(tail -1 "$out/run_$i.log")" >> "$out/results.txt"
done
