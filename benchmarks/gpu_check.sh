#!/usr/bin/env bash
# Every GPU check of headprof in one command, under 9 minutes on one H100 (prints a table; one JSON of all figures):
#   bash benchmarks/gpu_check.sh [OUT]          # from the repository root; OUT: a folder [default: a temporary one]
# Needs only what a CUDA machine with no package index has: its CUDA PyTorch (with Triton), this checkout, and
# transformers (a wheel beside it, installed with --no-deps, if the machine lacks it).
# 1. the CUDA tests: every per-head attention backend (the Triton kernel, torch SDPA, flash-attn's kv-cache kernel
#    if installed) against the per-head reference in bf16, and a whole generation through the kernel
# 2. `headprof score` and `headprof run` in bf16 on a hub-format Llama-3-shaped model built in code, per backend
# 3. decode per step against a dense cache of the same tokens at batch 1, 32 and 512, and sequences under an 8 GB KV
#    cap: a Llama-3-8B-shaped attention stack (32 query / 8 KV heads, head_dim 128, 8 layers), bf16, 4k prompts,
#    HeadKV, AdaKV and SnapKV at budgets 64 and 128, the kernel against the torch path (benchmarks/bench_throughput.py)
# 4. scoring at batch 16 against model.generate of the same prompts for the same steps (benchmarks/bench_score.py)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
out=${1:-$tmp/out}
mkdir -p "$out"
$PY - <<'PY' | tee "$out/versions.txt"
import importlib.util, torch, transformers
triton = importlib.util.find_spec("triton")
print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else '-'}, "
      f"triton {__import__('triton').__version__ if triton else 'no'}, "
      f"flash_attn {'yes' if importlib.util.find_spec('flash_attn') else 'no'}")
from headprof.kv import readers
print("per-head attention backends for bf16, the default first:", readers.available("cuda", torch.bfloat16))
PY
echo "== 1. CUDA tests"
$PY -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_kernel.py -rs 2>&1 | tail -15
echo "== 2. score and run in bf16 on a model built in code"
$PY -c "import sys; sys.path.insert(0, 'benchmarks'); from headprof import quiet; quiet.third_party(); import synthetic; synthetic.save('$tmp/model', layers=8)"
$PY -m headprof score "$tmp/model" --method retrieval --lengths 2000 --depths 3 --no-filter --device cuda \
    --dtype bfloat16 --out "$tmp/profile.json" --quiet
$PY -c "print(' '.join(['The harbour is quiet tonight.'] * 200) + ' What is quiet?')" > "$tmp/prompt.txt"
backends=$($PY -c "import torch; from headprof.kv import readers; print(*readers.available('cuda', torch.bfloat16))")
[[ " $backends " == *" flash "* ]] || echo "-- flash-attn is not available here: the flash run is skipped"
for backend in $backends; do
  echo "-- run, HEADPROF_ATTENTION=$backend"
  HEADPROF_ATTENTION=$backend $PY -m headprof run --model "$tmp/model" --profile "$tmp/profile.json" \
      --budget 64 --max-new-tokens 16 --device cuda --dtype bfloat16 --json "$tmp/prompt.txt" \
      | $PY -c "import json, sys; r = json.load(sys.stdin); print({k: r[k] for k in ('prompt_tokens', 'agreement')}, [(x['method'], round(x['kv_bytes'] / x['kv_bytes_ideal'], 3), round(x['decode_tokens_per_s'] or 0, 1)) for x in r['runs']])"
done
echo "== 3. decode per step vs a dense cache, and sequences under an 8 GB KV cap (head_dim 128, bf16, 4k prompts)"
for backend in triton torch; do
  [[ " $backends " == *" $backend "* ]] || { echo "-- $backend is not available here: skipped"; continue; }
  echo "-- per-head backend: $backend"
  $PY benchmarks/bench_throughput.py --device cuda --dtype bfloat16 --length 4096 --head-dim 128 --layers 8 \
      --budgets 64,128 --methods headkv,adakv,snapkv --dense-batches 1,32,512 --kv-cap-mb 8192 --max-batch 512 \
      --new-tokens 16 --repeats 2 --backend "$backend" --json "$out/throughput-$backend.json"
done
echo "== 4. scoring at batch 16 against model.generate of the same prompts and steps (the model of step 2, bf16)"
$PY benchmarks/bench_score.py --device cuda --dtype bfloat16 --model "$tmp/model" --lengths 4000 --batch-sizes 1,16 \
    --no-naive --json "$out/score.json"
$PY - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
every = {"versions": (out / "versions.txt").read_text().strip().splitlines()}
for f in sorted(out.glob("*.json")):
    if f.name != "gpu_check.json":
        every[f.stem] = json.loads(f.read_text())
(out / "gpu_check.json").write_text(json.dumps(every, indent=1))
print(f"every figure: {out / 'gpu_check.json'}")
PY
