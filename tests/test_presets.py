"""`score --preset headkv / retrieval-head` against the independent port of the official loops."""

import json
from dataclasses import replace

import numpy as np
import pytest
from fakes import loaded
from tiny import char_tokenizer

from headprof import capture
from headprof.errors import ProbeError
from headprof.probing import presets, reference, scoring

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


def folder(tmp_path, records, first: int = 0):
    """A needles folder in the official layout: needle i's haystack in part{i + first} (Retrieval_Head: first 1)."""
    d = tmp_path / "haystack"
    d.mkdir(parents=True)
    (d / "needles.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for i in range(len(records)):
        (d / f"part{i + first}").mkdir()
        (d / f"part{i + first}" / "p1.txt").write_text(HAY * (i + 1))
    return d


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gemma2"])
@pytest.mark.parametrize("preset,records", [("headkv", R2_NEEDLES), ("retrieval-head", RETRIEVAL_NEEDLES)])
def test_preset_equals_the_official_port(tmp_path, arch, preset, records):
    lm = replace(loaded(arch), tokenizer=char_tokenizer(fuse=True))
    p = presets.get(preset)
    f = presets.Folder(folder(tmp_path, records, p.first_part), p)
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


@pytest.mark.parametrize("preset,records", [("headkv", R2_NEEDLES), ("retrieval-head", RETRIEVAL_NEEDLES)])
def test_a_bf16_preset_run_computes_the_scored_attention_as_the_official_file(tmp_path, preset, records):
    """bf16: QK^T and the cast-back softmax in the model's dtype, as the scripts' modelling file decodes; the same
    tokens as the port (which decodes with eager attention, that computation), its sums to 1e-3."""
    import torch

    lm = replace(loaded("llama"), tokenizer=char_tokenizer(fuse=True), dtype="bfloat16")
    lm.model.to(torch.bfloat16)
    p = presets.get(preset)
    f = presets.Folder(folder(tmp_path, records, p.first_part), p)
    ps = presets.probe_set(f, p, [330, 420], 2)
    prof = scoring.score(lm, ps, scoring.Settings(p.method, preset=preset, filter_probes=False), f, batch_size=4)
    assert prof.environment["batch_size"] == 1  # one probe at a time, as the scripts: a bf16 batch rounds otherwise
    fp32_path = 0
    for probe, got in zip(ps.probes, prof.data["probes"], strict=True):
        r = records[probe.part]
        want = reference.official_probe(lm, f.texts[probe.part], r["needle"], r["question"], r["real_needle"],
                                        r.get("answer"), probe.length, probe.depth, r2=p.method == "r2")
        assert got["response"] == want.response and got["success"] == want.success
        np.testing.assert_allclose(np.asarray(got["scores"]), want.scores, atol=1e-3)
        fp32_path += want.scores.sum()
    assert fp32_path > 0 or p.method != "r2"


def test_official_attention_is_the_modelling_files_arithmetic():
    import torch

    # SmolLM2's shape (9 query heads over 3 KV heads, 64 dims) at 240 keys: on this input a matmul of grouped
    # rows rounds the values' weighted sum otherwise than the file's one row per head (what decoded another
    # token on a golden probe), so only the file's layout passes
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 1, 64, generator=g).bfloat16() * 2
    k, v = torch.randn(1, 3, 240, 64, generator=g).bfloat16(), torch.randn(1, 3, 240, 64, generator=g).bfloat16()
    out, probs = capture.official_attention(q, k, v, None, 64 ** -0.5)
    kk, vv = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)  # the file's repeat_kv
    logits = torch.matmul(q, kk.transpose(2, 3)) / 8.0
    want = torch.nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(torch.bfloat16)
    assert torch.equal(probs, want) and torch.equal(out, torch.matmul(want, vv).transpose(1, 2))


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
    assert presets.official_lengths(8192) == [0, 2036, 4071, 6106, 8142]  # numpy rounds half to even
    assert presets.official_lengths(0) == [0, 2500, 5000, 7500, 10000]  # start.sh: -s 0 -e 10000
    # length 0 (and any length inside the 200-token buffer) leaves the needle alone, as the scripts' slices do
    assert presets.context(tok, HAY, R2_NEEDLES[0]["needle"], 0, 0.5) == R2_NEEDLES[0]["needle"]
    assert presets.context(tok, HAY, R2_NEEDLES[0]["needle"], 150, 0.3) == reference.official_context(
        tok, HAY, R2_NEEDLES[0]["needle"], 150, 30)


class _Vocab:
    """A tokenizer stand-in that spells ids as tokens: "<0x0A>" at 7, 144 as "Å", "\n" as "Ċ" (byte-level BPE)."""

    unk_token_id = 0
    spelled = {7: "<0x0A>", 144: "Å", 198: "Ċ", 2: "</s>"}

    def convert_tokens_to_ids(self, token):
        return next((i for i, t in self.spelled.items() if t == token), self.unk_token_id)

    def convert_ids_to_tokens(self, i):
        return self.spelled.get(i, "x")

    def decode(self, ids, **kw):
        return "".join("\n" if i in (7, 198) else "x" for i in ids)


class _Config:
    eos_token_id = 2


def _stops(preset: str, tokens: list[int], answer: int | None = None) -> tuple[str, int]:
    ends, newlines = presets.stop_ids(_Vocab(), _Config(), presets.get(preset))
    d = scoring.Decoder(_Vocab(), ends, 50, official=True, answer_tokens=answer, newlines=frozenset(newlines))
    out: list[int] = []
    for t in tokens:
        if d.done(t, out):
            break
    return d.reason, len(out)


def test_the_official_decode_stops_as_the_scripts_test_it():
    assert presets.stop_ids(_Vocab(), _Config(), presets.get("headkv")) == ({2}, {7, 144})
    assert presets.stop_ids(_Vocab(), _Config(), presets.get("retrieval-head")) == (set(), {7, 144})
    # a byte-level newline (198) is not the scripts' newline: decoding goes on through it, for 50 steps
    assert _stops("retrieval-head", [5, 198, 5] + [5] * 60) == ("cap", 50)
    assert _stops("retrieval-head", [5, 144, 5]) == ("line", 2)  # id 144, whatever it spells, ends the loop
    assert _stops("retrieval-head", [5, 7, 5]) == ("line", 2)  # the token spelled <0x0A>
    assert _stops("retrieval-head", [5, 2] + [5] * 60)[1] == 50  # no end test for retrieval: the end token is text
    assert _stops("headkv", [5, 2, 5]) == ("eos", 2)  # R2 tests the config's end token, counted as output
    assert _stops("headkv", [5, 198, 5, 5, 5], answer=3) == ("answer", 3)  # and the answer's token length


@pytest.mark.parametrize("setup,message", [
    (lambda d: (d / "needles.jsonl").unlink(), "needles.jsonl not found"),
    (lambda d: (d / "needles.jsonl").write_text('{"needle": "a", "question": "b", "real_needle": "a"}\n'),
     r"needles.jsonl:1: the record has no 'answer'"),
    (lambda d: (d / "needles.jsonl").write_text("[1]\n"), r"needles.jsonl:1: the record has no 'needle'"),
    (lambda d: (d / "part1" / "p1.txt").unlink(), r"reads part0, part1 \(one per needle\) .*; the folder has part0$"),
])
def test_bad_folders_name_the_file_and_field(tmp_path, setup, message):
    d = folder(tmp_path, R2_NEEDLES)
    setup(d)
    with pytest.raises(ProbeError, match=message):
        presets.Folder(d, presets.get("headkv"))


def test_each_preset_reads_the_parts_its_script_reads(tmp_path):
    d = folder(tmp_path, RETRIEVAL_NEEDLES)  # part0: HeadKV-R2's layout
    with pytest.raises(ProbeError, match=r"--preset retrieval-head reads part1 .*; the folder has part0$"):
        presets.Folder(d, presets.get("retrieval-head"))
    assert presets.Folder(d, replace(presets.get("headkv"), needs_answer=False)).texts == [HAY]
    many = folder(tmp_path / "many", RETRIEVAL_NEEDLES * 4, first=1)
    with pytest.raises(ProbeError, match=r"holds 4 needles; --preset retrieval-head reads 3, one per part1..part3"):
        presets.Folder(many, presets.get("retrieval-head"))
    with pytest.raises(ProbeError, match="unknown preset 'kvpress'"):
        presets.get("kvpress")


def test_a_real_needle_missing_from_the_prompt_is_refused(tmp_path):
    records = [{**R2_NEEDLES[0], "real_needle": "Zyx qwv jjj kkk."}]
    p = presets.get("headkv")
    f = presets.Folder(folder(tmp_path, records), p)
    ps = presets.probe_set(f, p, [330], 1)
    with pytest.raises(ProbeError, match=r"real_needle 'Zyx qwv jjj kkk\.' was not found .*best token overlap"):
        presets.render(ps.probes[0], char_tokenizer(fuse=True), f, p)
