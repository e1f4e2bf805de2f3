#!/usr/bin/env bash
# End-to-end check of the GPU path on a CUDA machine, in one command (prints what it measured):
#   bash benchmarks/gpu_check.sh            # from the repository root
# 1. the CUDA tests: both attention backends (torch SDPA; flash-attn's kv-cache kernel if installed) vs the
#    per-head reference, bf16
# 2. `headprof score` and `headprof run` in bf16 on a hub-format Llama-3-shaped model built in code
# 3. benchmarks/bench_scale.py on CUDA: decode tok/s per attention backend at 4k, 8k and 32k-token prompts
# 4. benchmarks/bench_score.py on CUDA: scoring probes/s at batch 1, 4, 8 and 16 vs plain prefills
# 5. benchmarks/bench_throughput.py on CUDA: sequences under a KV cap and decode tok/s at that batch, 4k prompts
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$PY - <<'PY'
import importlib.util, torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.cuda.is_available()}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else '-'}, "
      f"flash_attn {'yes' if importlib.util.find_spec('flash_attn') else 'no'}")
from headprof import attention
print("attention backends for bf16:", attention.available("cuda", torch.bfloat16))
PY
echo "== 1. CUDA tests"
$PY -m pytest -q -p no:cacheprovider tests/test_attention.py -rs
echo "== 2. score and run in bf16 on a model built in code"
$PY -c "import sys; sys.path.insert(0, 'benchmarks'); from headprof import quiet; quiet.third_party(); import synthetic; synthetic.save('$tmp/model', layers=8)"
$PY -m headprof score "$tmp/model" --method retrieval --lengths 2000 --depths 3 --no-filter --device cuda \
    --dtype bfloat16 --out "$tmp/profile.json" --quiet
$PY -c "print(' '.join(['The harbour is quiet tonight.'] * 200) + ' What is quiet?')" > "$tmp/prompt.txt"
backends=$($PY -c "import torch; from headprof import attention; print(*attention.available('cuda', torch.bfloat16))")
[[ " $backends " == *" flash "* ]] || echo "-- flash-attn is not available here: the flash run is skipped"
for backend in $backends; do
  echo "-- run, HEADPROF_ATTENTION=$backend"
  HEADPROF_ATTENTION=$backend $PY -m headprof run --model "$tmp/model" --profile "$tmp/profile.json" \
      --budget 64 --max-new-tokens 16 --device cuda --dtype bfloat16 --json "$tmp/prompt.txt" \
      | $PY -c "import json, sys; r = json.load(sys.stdin); print({k: r[k] for k in ('prompt_tokens', 'agreement')}, [(x['method'], round(x['kv_bytes'] / x['kv_bytes_ideal'], 3), round(x['decode_tokens_per_s'] or 0, 1)) for x in r['runs']])"
done
echo "== 3. decode speed at scale (Llama-3-shaped, 32 layers, bf16)"
$PY benchmarks/bench_scale.py --device cuda --dtype bfloat16 --lengths 4096,8192,32768 --new-tokens 64
echo "== 4. scoring throughput by batch size (the model of step 2, bf16, 4000-token probes)"
$PY benchmarks/bench_score.py --device cuda --dtype bfloat16 --model "$tmp/model" --lengths 4000 --no-naive
echo "== 5. concurrency under a KV cap (Llama-3-shaped, bf16, 4k-token prompts, 8 GB of KV)"
$PY benchmarks/bench_throughput.py --device cuda --dtype bfloat16 --length 4096 --kv-cap-mb 8192 --max-batch 512
