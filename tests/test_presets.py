"""`score --preset headkv / retrieval-head` against the independent port of the official loops."""

import json
from dataclasses import replace

import numpy as np
import pytest
from fakes import loaded
from tiny import char_tokenizer

from headprof import presets, reference, scoring
from headprof.errors import ProbeError

HAY = ("The harbour lights came on one by one. Boats rocked against the pier while gulls argued overhead. "
       "A bell rang twice from the chapel. Nobody hurried on such evenings. ")
R2_NEEDLES = [
    {"needle": " Odo keeps bees. Ula keeps goats. Odo is 40. Ula is 31.", "question": "What does the older keep?",
     "real_needle": "Odo keeps bees.", "answer": "Odo keeps bees."},
    {"needle": "Ivo sails boats. Ada paints walls. Ivo is 22. Ada is 57.", "question": "What does the older do?",
     "real_needle": "Ada paints walls.", "answer": "Ada paints walls."},
]
RETRIEVAL_NEEDLES = [{"needle": "The best thing to do in Tarn is to swim in the cold lake at dawn.",
                      "question": "What is the best thing to do in Tarn?",
                      "real_needle": "swim in the cold lake at dawn"}]


def folder(tmp_path, records):
    d = tmp_path / "haystack"
    d.mkdir()
    (d / "needles.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for i in range(len(records)):
        (d / f"part{i}").mkdir()
        (d / f"part{i}" / "p1.txt").write_text(HAY * (i + 1))
    return d


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gemma2"])
@pytest.mark.parametrize("preset,records", [("headkv", R2_NEEDLES), ("retrieval-head", RETRIEVAL_NEEDLES)])
def test_preset_equals_the_official_port(tmp_path, arch, preset, records):
    lm = replace(loaded(arch), tokenizer=char_tokenizer(fuse=True))
    p = presets.get(preset)
    f = presets.Folder(folder(tmp_path, records), p)
    ps = presets.probe_set(f, p, [330, 420], 3)
    prof = scoring.score(lm, ps, scoring.Settings(p.method, preset=preset, filter_probes=False), f)
    rows = {r["id"]: r for r in prof.data["probes"]}
    assert len(rows) == len(records) * 2 * 3
    total = 0.0
    for probe in ps.probes:
        r = records[probe.part]
        want = reference.official_probe(lm, f.texts[probe.part], r["needle"], r["question"], r["real_needle"],
                                        r.get("answer"), probe.length, probe.depth, r2=p.method == "r2")
        got = rows[probe.id]
        assert got["answer_span"] == list(want.span) and got["tokens"] == len(want.prompt_ids)
        assert got["response"] == want.response and got["success"] == want.success
        assert got["metric"] == pytest.approx(want.metric, abs=1e-6)
        np.testing.assert_allclose(np.asarray(got["scores"]), want.scores, atol=1e-5)
        total += want.scores.sum()
    if p.method == "r2":
        assert total > 0  # not vacuous
    params = prof.data["method"]["params"]
    assert params["preset"] == preset and params["success_metric"] == p.rule and not params["chat_template"]


def test_the_port_finds_the_needle_where_it_was_put():
    tok = char_tokenizer(fuse=True)
    text = presets.context(tok, HAY, R2_NEEDLES[0]["needle"], 400, 0.5)
    assert text == reference.official_context(tok, HAY, R2_NEEDLES[0]["needle"], 400, 50)
    assert len(tok(text)["input_ids"]) == 400 - presets.BUFFER
    before = text[:text.index(R2_NEEDLES[0]["needle"])]
    assert before.endswith(".")  # inserted at a sentence break
    ids = tok(text)["input_ids"]
    fact = tok("Odo keeps bees.")["input_ids"]
    start, end, overlap = presets.find_span(ids, fact, None)
    assert overlap == 1.0 and (start, end) == reference.find_needle_idx(ids, fact, r2=True)
    assert presets.official_depths(10) == [0.0, 0.11, 0.22, 0.33, 0.44, 0.56, 0.67, 0.78, 0.89, 1.0]
    assert presets.official_lengths(8192) == [1000, 2786, 4571, 6356, 8142]  # numpy rounds half to even


@pytest.mark.parametrize("setup,message", [
    (lambda d: (d / "needles.jsonl").unlink(), "needles.jsonl not found"),
    (lambda d: (d / "needles.jsonl").write_text('{"needle": "a", "question": "b", "real_needle": "a"}\n'),
     r"needles.jsonl:1: the record has no 'answer'"),
    (lambda d: (d / "needles.jsonl").write_text("[1]\n"), r"needles.jsonl:1: the record has no 'needle'"),
    (lambda d: (d / "part1" / "p1.txt").unlink(), "part1 holds no .txt haystack"),
])
def test_bad_folders_name_the_file_and_field(tmp_path, setup, message):
    d = folder(tmp_path, R2_NEEDLES)
    setup(d)
    with pytest.raises(ProbeError, match=message):
        presets.Folder(d, presets.get("headkv"))
    with pytest.raises(ProbeError, match="unknown preset 'kvpress'"):
        presets.get("kvpress")


def test_a_real_needle_missing_from_the_prompt_is_refused(tmp_path):
    records = [{**R2_NEEDLES[0], "real_needle": "Zyx qwv jjj kkk."}]
    p = presets.get("headkv")
    f = presets.Folder(folder(tmp_path, records), p)
    ps = presets.probe_set(f, p, [330], 1)
    with pytest.raises(ProbeError, match=r"real_needle 'Zyx qwv jjj kkk\.' was not found .*best token overlap"):
        presets.render(ps.probes[0], char_tokenizer(fuse=True), f, p)
