#!/usr/bin/env bash
# The golden files of tests/test_official_golden.py, from the official HeadKV scripts themselves (CPU, one core).
# usage: bash benchmarks/official_golden.sh HEADKV_CHECKOUT WORK_DIR   (run from the repository root, headprof's
#        environment active: it converts the model; the scripts run in WORK_DIR/venv, transformers 4.37.2)
set -euo pipefail
if [ $# -ne 2 ]; then echo "usage: bash benchmarks/official_golden.sh HEADKV_CHECKOUT WORK_DIR" >&2; exit 2; fi
headkv=$(realpath "$1") work=$(realpath -m "$2") out=tests/data/official
[ -f "$headkv/Important_Head/retrieval_head_detection_r2.py" ] || { echo "$headkv is not a HeadKV checkout" >&2; exit 2; }
mkdir -p "$work"
python benchmarks/hf_folder.py smollm2-135m "$work/smollm2"
if [ ! -x "$work/venv/bin/python" ]; then
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install -q torch==2.13.0
  "$work/venv/bin/pip" install -q transformers==4.37.2 accelerate==0.26.1 numpy ipdb sentencepiece rouge_score
fi
lengths=400,800 depths=0,50,100
for dtype in float32 bfloat16; do
  for case in "r2 $headkv/Important_Head/haystack_for_detect_r2 official_r2" \
              "retrieval $headkv/Important_Head/haystack_for_detect official_retrieval" \
              "r2 $out/prose_r2 prose_r2" "retrieval $out/prose_retrieval prose_retrieval"; do
    set -- $case
    [ -f "$out/$3-$dtype.json" ] && continue  # made already (delete it to make it again)
    OMP_NUM_THREADS=1 "$work/venv/bin/python" benchmarks/official_golden.py --headkv "$headkv" \
        --model "$work/smollm2/hf437" --script "$1" --haystack "$2" --lengths $lengths --depths $depths \
        --dtype $dtype --out "$out/$3-$dtype.json"
  done
done
