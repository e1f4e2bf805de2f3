#!/usr/bin/env bash
# kvpress's leaderboard protocol on RULER (each item's context compressed alone, then its question read through the
# compressed cache): headprof's methods (one eval per task, as ruler_grid.sh) and kvpress's presses (in
# .venv-kvpress: bash benchmarks/peer_kvpress_venv.sh) on the same items, joined into OUT/all/results.json.
# usage: bash benchmarks/kvpress_protocol_grid.sh MODEL OUT ITEMS FIRST_ITEM RATIOS [PRESSES]
# e.g.   bash benchmarks/kvpress_protocol_grid.sh qwen2.5-coder-0.5b results/kvpress-protocol-qwen05 8 0 0.5,0.75,0.9
# LENGTH (default 4096), TASKS (default all 13) and METHODS (headprof's) may be set in the environment. A rerun
# resumes: finished tasks and kvpress rows already written are kept.
set -euo pipefail
if [ $# -lt 5 ]; then
  echo "usage: bash benchmarks/kvpress_protocol_grid.sh MODEL OUT ITEMS FIRST_ITEM RATIOS [PRESSES]" >&2; exit 2
fi
model=$1 out=$2 items=$3 first=$4 ratios=$5
presses=${6:-snapkv,snapkv-w16,adakv,streaming,keydiff,expected_attention,kvzip}  # not pyramidkv: peer_kvpress.py says why
methods=${METHODS:-full,streaming,snapkv,pyramidkv,adakv,headkv-retrieval,headkv-r2}
length=${LENGTH:-4096}
here=$(dirname "$0")
span="items$first-$((first + items - 1))"
mkdir -p "$out"

EVAL_ARGS=--no-compress-questions bash "$here/ruler_grid.sh" "$model" "$out/headprof" "$length" "$items" "$first" \
    "$ratios" "$methods"
suite="ruler"
[ -n "${TASKS:-}" ] && suite="ruler:$(echo $TASKS | tr ' ' ',')"
[ -f "$out/$span.jsonl" ] || headprof eval "$model" --suite "$suite" --lengths "$length" --items "$items" \
    --first-item "$first" --ratios "$ratios" --methods full --no-compress-questions \
    --export-items "$out/$span.jsonl" --out "$out/export"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$here/../.venv-kvpress/bin/python" "$here/peer_kvpress.py" run \
    --no-compress-questions --items "$out/$span.jsonl" --model-dir "$(headprof info "$model" --path)" \
    --ratios "$ratios" --presses "$presses" --out "$out/kvpress-$span.jsonl"
python "$here/combine_results.py" "$out/headprof-all" "$out/headprof/$span"/*/ --force
python "$here/peer_kvpress.py" merge --results "$out/headprof-all/results.json" --items "$out/$span.jsonl" \
    --rows "$out/kvpress-$span.jsonl" --out "$out/all" --force
python "$here/results_table.py" "$out/all/results.json"
