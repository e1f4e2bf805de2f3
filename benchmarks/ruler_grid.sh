#!/usr/bin/env bash
# One RULER eval per task (a long grid keeps every task that finished), then combined.
# usage: bash benchmarks/ruler_grid.sh MODEL OUT LENGTH ITEMS FIRST_ITEM RATIOS [METHODS]
# e.g.   bash benchmarks/ruler_grid.sh smollm2-135m results/ruler4k-smollm2 4096 8 0 0.5,0.75,0.9,0.97
# TASKS="..." runs some tasks only; EVAL_ARGS="..." passes more options to every eval (e.g. --no-compress-questions,
# --resume to continue a task's partial run); run it once per core to share a grid's tasks
set -euo pipefail
if [ $# -lt 6 ]; then
  echo "usage: bash benchmarks/ruler_grid.sh MODEL OUT LENGTH ITEMS FIRST_ITEM RATIOS [METHODS]" >&2; exit 2
fi
model=$1 out=$2 length=$3 items=$4 first=$5 ratios=$6
methods=${7:-full,streaming,snapkv,pyramidkv,adakv,headkv-retrieval,headkv-r2}
tasks=${TASKS:-"niah_single_1 niah_single_2 niah_multikey_1 niah_multikey_2 qa_1 qa_2 vt fwe niah_single_3 niah_multikey_3 niah_multivalue niah_multiquery cwe"}
# Several runs of one grid (one per core) share its tasks: each takes a task no other run holds (a lock folder
# beside the task's, removed when the task ends or the run stops).
lock=""
trap '[ -n "$lock" ] && rmdir "$lock" 2>/dev/null; true' EXIT
for t in $tasks; do
  dir="$out/items$first-$((first + items - 1))/$t"
  [ -f "$dir/results.json" ] && continue
  mkdir -p "$(dirname "$dir")"
  mkdir "$dir.lock" 2>/dev/null || continue
  lock="$dir.lock"
  if [ -f "$dir/results.json" ]; then rmdir "$lock"; lock=""; continue; fi  # finished while we looked
  start=$(date +%s)
  headprof eval "$model" --suite "ruler:$t" --lengths "$length" --items "$items" --first-item "$first" \
      --ratios "$ratios" --methods "$methods" --out "$dir" ${EVAL_ARGS:-}
  echo "$t: $(( $(date +%s) - start )) s" >> "$out/times.txt"
  rmdir "$lock"; lock=""
done
