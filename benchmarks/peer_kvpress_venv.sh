#!/usr/bin/env bash
# The environment benchmarks/peer_kvpress.py runs kvpress in (kvpress 0.5.5 pins transformers < 5.3; headprof
# runs 5.24), made in one command from the repository root:  bash benchmarks/peer_kvpress_venv.sh
# torch is pinned first so that pip takes the CPU wheel instead of GBs of CUDA packages (drop the pin on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-kvpress
.venv-kvpress/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv-kvpress/bin/pip install -q "kvpress==0.5.5" "transformers<5.3"
.venv-kvpress/bin/python -c "import kvpress, transformers; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', 'transformers', transformers.__version__)"
