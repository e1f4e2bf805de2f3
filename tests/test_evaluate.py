import json
import subprocess
import sys

import numpy as np
import pytest
from fakes import loaded
from tiny import save

from headprof import methods as methods_mod
from headprof.artefacts import profile
from headprof.errors import HeadprofError, OutputError, ProbeError
from headprof.evaluation import evaluate
from headprof.kv import heads
from headprof.probing import probes

SCHEMA_KEYS = {"results_version", "model", "methods", "budgets", "betas", "chosen_beta", "window", "kernel",
               "items", "validation_items", "summary", "by_task", "rows"}
SUMMARY_KEYS = {"method", "budget", "n", "f1", "f1_low", "f1_high", "contains", "contains_low", "contains_high",
                "agreement", "kv_bytes", "seconds"}


def _items(lm, n=3, length=80):
    rng = np.random.default_rng(0)
    return [evaluate.Item(f"i{i}", "needle", rng.integers(0, 96, length).tolist(), ["w1 w2"]) for i in range(n)]


def _profile(lm):
    layers, heads, kv = lm.info.layout.num_layers, lm.info.layout.num_query_heads, lm.info.layout.num_kv_heads
    q = np.random.default_rng(1).random((layers, heads))
    return profile.Profile({"model": {"num_layers": layers, "num_query_heads": heads, "num_kv_heads": kv},
                            "scores": {"query": q.tolist(), "kv": profile.Profile.kv_reduce(q, kv)}, "probes": [],
                            "method": {"name": "r2"}})


def test_grid_full_is_budget_independent_and_large_budget_matches_full():
    lm = loaded("llama")
    methods = ["full", "streaming", "snapkv", "pyramidkv", "adakv", "headkv-r2"]
    res = evaluate.evaluate(lm, _items(lm), methods, [16, 200], {"r2": _profile(lm)}, max_new_tokens=4,
                            window=8)
    assert SCHEMA_KEYS <= set(res) and all(SUMMARY_KEYS <= set(r) for r in res["summary"])
    rows = res["rows"]
    for item in ("i0", "i1", "i2"):
        full = {r["response"] for r in rows if r["item"] == item and r["method"] == "full"}
        assert len(full) == 1  # full gives identical answers at every budget
        at_200 = {r["response"] for r in rows if r["item"] == item and r["budget"] == 200}
        assert at_200 == full  # a budget above the context: every method answers like the full cache
    assert {r["agreement"] for r in rows if r["budget"] == 200} == {1.0}
    small = [r for r in rows if r["budget"] == 16 and r["method"] != "full"]
    full_bytes = [r["kv_bytes"] for r in rows if r["method"] == "full"][0]
    assert all(r["kv_bytes"] < full_bytes for r in small)
    assert len(res["summary"]) == len(methods) * 2
    assert res["by_task"]["needle"] == res["summary"]  # one task: its summary is the whole summary


def test_reasoning_items_naming_a_distractor_do_not_count():
    assert evaluate.contains("It is the harp.", ["harp"], ("oboe", "violin")) == 1.0
    assert evaluate.contains("the harp or the oboe", ["harp"], ("oboe", "violin")) == 0.0
    assert evaluate.contains("the harp or the oboe", ["harp"]) == 1.0  # needle items have no distractors


def test_beta_list_is_chosen_on_validation_half():
    lm = loaded("llama")
    res = evaluate.evaluate(lm, _items(lm, 4), ["full", "headkv-r2"], [16], {"r2": _profile(lm)},
                            betas=[1.01, 5.0], max_new_tokens=3, window=8)
    assert res["validation_items"] == 2 and res["items"] == 2
    assert res["chosen_beta"]["headkv-r2"]["16"] in (1.01, 5.0)
    assert {r["n"] for r in res["summary"]} == {2}


def test_overlap_detection():
    ps = probes.build_probe_set("retrieval", [500], 3, seed=0)
    prof = profile.Profile({"probes": [{"needle": ps.probes[1].needle, "question": "x"}]})
    assert evaluate.overlapping(prof, ps) == [ps.probes[1].id]
    redrawn = probes.build_probe_set("retrieval", [500], 3, seed=0, exclude=evaluate.used_texts([prof]))
    assert evaluate.overlapping(prof, redrawn) == [] and redrawn.probes[0] == ps.probes[0]


def test_metrics():
    assert evaluate.contains("It is under the Blue flowerpot!", ["under the blue flowerpot"]) == 1.0
    assert evaluate.best_f1("seashells", ["glass", "seashells"]) == 1.0


@pytest.mark.parametrize("content,message", [
    ('{"context": "c", "question": "q"}\n', "expected JSON"),
    ('{"context": "", "question": "q", "answers": ["a"]}\n', "non-empty"),
])
def test_bad_tasks_files(tmp_path, content, message):
    f = tmp_path / "t.jsonl"
    f.write_text(content)
    with pytest.raises(ProbeError, match=message):
        evaluate.file_items(loaded("llama"), f)
    f.write_bytes(b"\xff\xfe")
    with pytest.raises(ProbeError, match="cannot read"):
        evaluate.file_items(loaded("llama"), f)


def test_eval_cli_writes_outputs_and_refuses_bad_input(tmp_path):
    model = save("llama", tmp_path / "tiny")
    prof_dir = tmp_path / "profs"
    run = lambda *a: subprocess.run([sys.executable, "-m", "headprof", *map(str, a)], capture_output=True,  # noqa: E731
                                    text=True, timeout=900)
    r = run("score", model, "--method", "r2", "--lengths", "200", "--depths", "2", "--out", prof_dir / "r2.json",
            "--one-round", "--max-new-tokens", "8", "--quiet")
    assert r.returncode == 0, r.stderr
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps({"context": "The boat is red. " * 8, "question": "What colour?",
                                           "answers": ["red"]}) for _ in range(2)))
    out = tmp_path / "res"
    args = [model, "--budgets", "24,400", "--methods", "full,snapkv,headkv-r2", "--profile-dir", prof_dir,
            "--tasks", tasks, "--max-new-tokens", "3", "--quiet", "--out", out]
    r = run("eval", *args)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert SCHEMA_KEYS <= set(res) and (out / "results.csv").read_text().startswith("method,budget")
    assert (out / "quality_vs_budget.png").stat().st_size > 1000
    assert not (tmp_path / "res.partial.jsonl").exists()  # the finished grid drops its partial file
    before = (out / "results.json").read_text()
    (tmp_path / "n3.partial.jsonl").write_text('{"run": {}}\n')  # left by an interrupted grid
    for bad, words in [(["--budgets", "0", "--out", tmp_path / "n1"], "positive"),
                       (["--methods", "full,magic", "--out", tmp_path / "n2"], "unknown method"),
                       (["--out", tmp_path / "n3"], "pass --resume"),
                       (["--out", tmp_path / "n3", "--resume"], "other settings"),
                       ([], "exists")]:
        r = run("eval", *args, *bad)
        assert r.returncode != 0 and "Traceback" not in r.stderr and words in r.stderr, r.stderr
    assert (out / "results.json").read_text() == before and not (tmp_path / "n1").exists()
    assert (tmp_path / "n3.partial.jsonl").read_text() == '{"run": {}}\n' and not (tmp_path / "n3").exists()
    other = tmp_path / "other"
    other.mkdir()
    d = json.loads((prof_dir / "r2.json").read_text())
    d["model"]["num_kv_heads"] = 4
    d["scores"]["kv"]["mean"] = d["scores"]["kv"]["max"] = [[0.0] * 4] * 3
    (other / "r2.json").write_text(json.dumps(d))
    r = run("eval", *args[:-1], tmp_path / "new", "--profile-dir", other)
    assert r.returncode != 0 and "made for" in r.stderr, r.stderr


@pytest.mark.parametrize("arch,compress_sliding", [("llama", True), ("gemma3", True), ("gemma3", False)])
def test_one_prefill_per_item_gives_the_per_cell_results(arch, compress_sliding):
    lm = loaded(arch)
    methods = ["full", "streaming", "snapkv", "pyramidkv", "adakv", "headkv-r2", "snapkv:window=4",
               "headkv:profile=r2,window=12"]  # methods with their own windows, narrower and wider than the grid's
    kw = dict(max_new_tokens=5, compress_sliding=compress_sliding, window=8)
    items = _items(lm, 2, length=120)
    shared = evaluate.evaluate(lm, items, methods, [16, 40], {"r2": _profile(lm)}, batch_cells=False, **kw)
    per_cell = evaluate.evaluate(lm, items, methods, [16, 40], {"r2": _profile(lm)}, share_prefill=False, **kw)
    batched = evaluate.evaluate(lm, items, methods, [16, 40], {"r2": _profile(lm)}, **kw)

    def strip(res, drop=("seconds",)):
        return [{k: v for k, v in r.items() if k not in drop} for r in res["rows"]]

    assert strip(shared) == strip(per_cell)
    # one batch of every cell: the same rows; a cell's bytes are its share of the batch's, within the slack
    assert strip(batched, ("seconds", "kv_bytes")) == strip(per_cell, ("seconds", "kv_bytes"))
    for a, b in zip(batched["rows"], per_cell["rows"], strict=True):
        assert abs(a["kv_bytes"] - b["kv_bytes"]) <= heads.SLACK * b["kv_bytes"] + 256, (a, b)
    assert len({r["response"] for r in shared["rows"]}) > 1  # the methods do not all answer alike


def test_probe_suite_chooses_headprof_tasks(monkeypatch):
    assert evaluate.probe_tasks(None) == ["needle", "reasoning"]
    assert evaluate.probe_tasks("probes:needle") == ["needle"]
    assert evaluate.probe_tasks("ruler:vt") is None
    for bad, message in [("probes:maths", "unknown probe task 'maths'"), ("helm", "unknown suite 'helm'")]:
        with pytest.raises(HeadprofError, match=message):
            evaluate.probe_tasks(bad)
    from headprof import api

    lm, asked = loaded("llama"), []

    def probe_items(lm, task, lengths, items, seed, exclude):
        asked.append(task)
        item = evaluate.Item(f"{task}-0", task, _items(lm, 1)[0].prompt_ids, ["w1"])
        return [item], probes.ProbeSet("t", "1", "retrieval", 0, (), 0, "", ())

    monkeypatch.setattr(evaluate, "probe_items", probe_items)
    res = api.evaluate(lm, [24], "full,snapkv", profiles={}, items=1, suite="probes:needle", max_new_tokens=2).data
    assert asked == ["needle"] and {r["task"] for r in res["rows"]} == {"needle"} and res["items"] == 1


def test_runs_on_disjoint_items_combine_into_the_grid_of_one_run():
    lm = loaded("llama")
    items = _items(lm, 4)
    for i, item in enumerate(items):
        item.task = "a" if i < 2 else "b"
    args = (["full", "snapkv", "headkv-r2"], [16], {"r2": _profile(lm)})
    whole = evaluate.evaluate(lm, items, *args, max_new_tokens=3, window=8, ratios=[0.5])
    parts = [evaluate.evaluate(lm, items[:2], *args, max_new_tokens=3, window=8, ratios=[0.5]),
             evaluate.evaluate(lm, items[2:], *args, max_new_tokens=3, window=8, ratios=[0.5])]
    combined = evaluate.combine(parts)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(combined["rows"]) == strip(whole["rows"]) and combined["items"] == 4
    for mine, theirs in zip(combined["summary"], whole["summary"], strict=True):
        assert {k: v for k, v in mine.items() if k != "seconds"} == {k: v for k, v in theirs.items() if k != "seconds"}
    assert set(combined["by_task"]) == {"a", "b"}
    with pytest.raises(HeadprofError, match=r"items i0, i1 occur in results 1 and 2: combined runs must hold"):
        evaluate.combine([parts[0], parts[0]])
    other = evaluate.evaluate(lm, items[2:], *args[:1], [24], args[2], max_new_tokens=3, window=8)
    with pytest.raises(HeadprofError, match=r"different grids cannot be combined \(budgets, ratios differ\)"):
        evaluate.combine([parts[0], other])
    # rows made with another in-head selection (results made before it was recorded used the old one)
    old = {k: v for k, v in parts[1].items() if k != "selection"}
    same = evaluate.combine([{**parts[0], "selection": evaluate.OLD_SELECTION}, old])
    assert same["items"] == 4
    with pytest.raises(HeadprofError, match=r"different grids cannot be combined \(selection differ\)"):
        evaluate.combine([{**parts[0], "selection": {"spread": 0, "decay": 0.9}}, old])


def test_combine_results_refuses_in_one_line_and_writes_nothing(tmp_path):
    from pathlib import Path

    lm = loaded("llama")
    run = tmp_path / "a"
    run.mkdir()
    res = evaluate.evaluate(lm, _items(lm, 2), ["full", "snapkv"], [16], {}, max_new_tokens=2, window=8)
    (run / "results.json").write_text(json.dumps(res))
    script = Path(__file__).parents[1] / "benchmarks" / "combine_results.py"
    for args in ([run, run], [run, tmp_path / "missing"]):
        r = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), *map(str, args)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "occur in results 1 and 2" in r.stderr or "cannot read" in r.stderr
        assert not (tmp_path / "out").exists()


def test_an_interrupted_grid_keeps_its_items_and_resumes_to_the_same_rows(tmp_path, monkeypatch):
    lm = loaded("llama")
    items = _items(lm, 3)
    args = (["full", "snapkv", "headkv-r2"], [16], {"r2": _profile(lm)})
    kw = {"max_new_tokens": 3, "window": 8, "ratios": [0.5]}
    whole = evaluate.evaluate(lm, items, *args, **kw)
    partial = tmp_path / "res.partial.jsonl"
    per_item = 1 + 2 * 2  # the full row, then 2 methods x (1 budget + 1 ratio)

    def stop_in_the_second_item(p):
        if p.done == per_item + 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(lm, items, *args, **kw, partial=partial, progress=stop_in_the_second_item)
    kept = partial.read_text().splitlines()
    assert len(kept) == 2 and json.loads(kept[1])["item"] == "i0"  # the header, then the one finished item
    partial.write_text("\n".join(kept) + '\n{"item": "i1", "rows": [cut off')  # killed while writing
    with pytest.raises(OutputError, match="pass --resume"):
        evaluate.evaluate(lm, items, *args, **kw, partial=partial)
    with pytest.raises(OutputError, match="other settings"):
        evaluate.evaluate(lm, items, args[0], [24], args[2], **kw, partial=partial, resume=True)
    prefilled = []
    real = evaluate.generation.prefill
    monkeypatch.setattr(evaluate.generation, "prefill", lambda lm, ids, w: prefilled.append(ids) or real(lm, ids, w))
    seen = []
    resumed = evaluate.evaluate(lm, items, *args, **kw, partial=partial, resume=True, progress=seen.append)
    assert prefilled == [items[1].prompt_ids, items[2].prompt_ids]  # the kept item is not run again
    assert seen[0].resumed == per_item and seen[-1].done == seen[-1].total == 3 * per_item
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed["rows"]) == strip(whole["rows"])
    assert len(partial.read_text().splitlines()) == 4  # the header and the three items


@pytest.mark.parametrize("command, what", [("eval", "items"), ("score", "probes")])
def test_ctrl_c_says_where_the_finished_work_is_and_exits_130(tmp_path, monkeypatch, command, what):
    from typer.testing import CliRunner

    from headprof import api
    from headprof.cli import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "evaluate" if command == "eval" else "score", interrupted)
    out = tmp_path / ("r" if command == "eval" else "p.json")
    r = CliRunner().invoke(app, [command, "some-model", "--out", str(out), "--quiet"])
    assert r.exit_code == 130, r.output
    assert r.output.strip() == (f"interrupted: finished {what} are kept in {api.partial_path(out)}; "
                                "rerun with --resume to continue")


def test_kvpress_protocol_compresses_the_context_alone_then_reads_the_question():
    """`compress_questions=False`: the context is prefilled and compressed alone, the question read through the
    compressed cache. The full cache gives the tokens of one prefill of the whole prompt; a budget above the context
    gives the full cache's; the batched cells give each cell's own run; budgets from ratios count the context."""
    from headprof.compressing import generation

    lm = loaded("llama")
    items = _items(lm, 2, 90)
    for item in items:
        item.question_start = 70
    ids = items[0].prompt_ids
    whole = generation.generate(lm, ids, "full", 0, max_new_tokens=5)
    asked = generation.generate(lm, ids, "full", 0, max_new_tokens=5, question_start=70)
    assert asked.tokens == whole.tokens
    above = generation.generate(lm, ids, "snapkv", 80, max_new_tokens=5, question_start=70)
    assert above.tokens == whole.tokens
    small = generation.generate(lm, ids, "snapkv:window=8", 24, max_new_tokens=5, question_start=70)
    mixed = generation.generate(lm, ids, "snapkv:window=8", 24, max_new_tokens=5)  # the question compressed too
    # each compressed head holds its budget of the context, then the 20 question tokens and the answer
    lay = lm.info.layout
    assert small.kv_entries_ideal == mixed.kv_entries_ideal + 20 * lay.num_layers * lay.num_kv_heads
    shared = generation.prefill(lm, ids[:70], 8)
    cells = [(methods_mod.resolve("snapkv:window=8"), 24), (methods_mod.resolve("pyramidkv:window=8"), 30)]
    batched = generation.generate_cells(lm, shared, cells, 5, question=ids[70:])
    alone = [generation.generate(lm, ids, m, b, max_new_tokens=5, question_start=70) for m, b in cells]
    assert [r.tokens for r in batched] == [r.tokens for r in alone]
    assert batched[0].kv_entries_ideal == alone[0].kv_entries_ideal
    res = evaluate.evaluate(lm, items, ["full", "snapkv"], [], {}, max_new_tokens=4, window=8, ratios=[0.5],
                            compress_questions=False)
    assert res["compress_questions"] is False
    assert {r["budget"] for r in res["rows"] if r["method"] == "snapkv"} == {35}  # half of the 70 context tokens
    with pytest.raises(HeadprofError, match="compress_questions differ"):
        evaluate.combine([res, evaluate.evaluate(lm, _items(lm, 1, 90), ["full", "snapkv"], [], {}, max_new_tokens=4,
                                                 window=8, ratios=[0.5])])
    with pytest.raises(HeadprofError, match="needs items with a separate question; i0 has none"):
        evaluate.evaluate(lm, _items(lm, 1, 90), ["full", "snapkv"], [32], {}, compress_questions=False)
