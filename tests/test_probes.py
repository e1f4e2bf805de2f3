import json

import pytest
from tiny import char_tokenizer

from headprof import probes
from headprof.errors import ProbeError
from headprof.haystack import Haystack


def test_probe_sets_are_deterministic_and_hashed():
    a = probes.build_probe_set("r2", [500, 1000], 4, seed=3)
    b = probes.build_probe_set("r2", [500, 1000], 4, seed=3)
    c = probes.build_probe_set("r2", [500, 1000], 4, seed=4)
    assert a.hash == b.hash and a.to_jsonl() == b.to_jsonl()
    assert a.hash != c.hash
    assert len(a.probes) == 8 and {p.depth for p in a.probes} == {0.0, 0.3333, 0.6667, 1.0}


def test_r2_needles_vary_and_answer_is_not_the_distractor():
    ps = probes.build_probe_set("r2", [1000, 2000, 3000], 10, seed=0)
    firsts = set()
    for p in ps.probes:
        assert p.answer in p.needle and p.distractor in p.needle and p.answer != p.distractor
        firsts.add(p.needle.index(p.answer) < p.needle.index(p.distractor))
    assert firsts == {True, False}  # sometimes the first candidate is correct, sometimes the second
    assert len({p.question.split()[0] for p in ps.probes}) > 1


def test_render_fits_length_and_finds_the_answer_span():
    tok = char_tokenizer()
    hs = Haystack(0)
    for p in probes.build_probe_set("retrieval", [400], 3, seed=1).probes:
        r = probes.render(p, tok, hs, chat_template=False)
        assert 400 - 120 < len(r.input_ids) <= 400  # within one (character-level) sentence
        start, end = r.answer_span
        assert "".join(tok.convert_ids_to_tokens(r.input_ids[start:end])) == p.answer


def test_depth_moves_the_needle():
    tok = char_tokenizer()
    ps = probes.build_probe_set("retrieval", [400], 3, seed=1)
    spans = [probes.render(p, tok, Haystack(0), False).answer_span[0] for p in ps.probes]
    assert spans[0] < spans[1] < spans[2]


def test_user_needles_and_haystack(tmp_path):
    needles = tmp_path / "n.jsonl"
    needles.write_text(json.dumps({"needle": "The vault code is 1234.", "question": "What is the vault code?",
                                   "answer": "1234"}) + "\n")
    hay = tmp_path / "h.txt"
    hay.write_text("One sentence here. Another one there! And a third?")
    hs = Haystack(0, hay)
    ps = probes.build_probe_set("retrieval", [200], 2, needles=probes.load_needles(needles, "retrieval"),
                                haystack=hs)
    assert ps.name == "custom" and all(p.answer == "1234" for p in ps.probes)
    r = probes.render(ps.probes[0], char_tokenizer(), hs, False)
    assert "Another one there!" in r.text


@pytest.mark.parametrize("content,message", [
    ('{"needle": "a", "question": "b"}\n', "expected JSON"),
    ('{"needle": "abc", "question": "q", "answer": "zzz"}\n', "does not occur"),
    ("", "holds no needles"),
])
def test_bad_needles(tmp_path, content, message):
    f = tmp_path / "n.jsonl"
    f.write_text(content)
    with pytest.raises(ProbeError, match=message):
        probes.load_needles(f, "retrieval")


def test_bad_grid():
    with pytest.raises(ProbeError):
        probes.build_probe_set("r2", [0], 3)
    with pytest.raises(ProbeError):
        probes.build_probe_set("r2", [100], 0)
    with pytest.raises(ProbeError):
        probes.build_probe_set("nope", [100], 1)
    with pytest.raises(ProbeError, match="not found"):
        probes.load_needles(__import__("pathlib").Path("/nonexistent.jsonl"), "r2")
