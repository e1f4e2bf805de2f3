import json

import jsonschema
import numpy as np
import pytest
from tiny import save

from headprof import models
from headprof.artefacts import profile
from headprof.errors import OutputError, ProfileError
from headprof.probing import probes, scoring


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return models.load(str(tiny_dir), device="cpu")


def _run(lm, method="r2", **kw):
    ps = probes.build_probe_set(method, [200, 300], 2, seed=0)
    return scoring.score(lm, ps, scoring.Settings(method, filter_probes=False, max_new_tokens=8), probes.Haystack(0),
                         **kw)


def test_profile_round_trip_and_schema(lm, tmp_path):
    prof = _run(lm)
    path = profile.save(prof, tmp_path / "p.json")
    again = profile.load(path)
    assert again.data == json.loads(json.dumps(prof.data))
    schema = json.loads(profile.SCHEMA_PATH.read_text())
    jsonschema.validate(again.data, schema)
    q = again.query_scores()
    assert q.shape == (3, 4) and again.kv_scores("mean").shape == (3, 2)
    np.testing.assert_allclose(again.kv_scores("max"), q.reshape(3, 2, 2).max(-1), atol=1e-7)
    assert again.data["probe_set"]["count"] == 4 and len(again.data["probes"]) == 4
    assert again.data["model"]["num_kv_heads"] == 2 and again.data["model"]["group_size"] == 2


def test_same_seed_same_scores(lm):
    a, b = _run(lm), _run(lm)
    assert a.data["scores"] == b.data["scores"] and a.data["probes"] == b.data["probes"]


def test_interrupted_run_resumes_to_the_same_result(lm, tmp_path):
    full = _run(lm, "retrieval")
    partial = tmp_path / "p.json.partial.jsonl"

    def stop_after_two(p):
        if p.done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(lm, "retrieval", partial=partial, progress=stop_after_two)
    kept = partial.read_text().splitlines()
    assert len(kept) == 3  # header + two finished probes
    partial.write_text("\n".join(kept) + '\n{"id": "cut off mid-wri')  # killed while writing
    with pytest.raises(OutputError, match="--resume"):
        _run(lm, "retrieval", partial=partial)
    seen = []
    resumed = _run(lm, "retrieval", partial=partial, resume=True, progress=lambda p: seen.append(p.resumed))
    assert seen[0] == 2
    assert resumed.data["scores"] == full.data["scores"] and resumed.data["probes"] == full.data["probes"]


def test_partial_from_other_settings_is_refused(lm, tmp_path):
    partial = tmp_path / "p.partial.jsonl"
    partial.write_text(json.dumps({"run": {"model": "something else"}}) + "\n")
    with pytest.raises(OutputError, match="other settings"):
        _run(lm, partial=partial, resume=True)


def test_filter_counts_only_successes(lm):
    ps = probes.build_probe_set("retrieval", [200], 2, seed=0)
    results = [{"id": p.id, "success": i == 0, "metric": 1.0, "response": "", "tokens": 1,
                "answer_span": [0, 1], "scores": [[float(i + 1)] * 4] * 3} for i, p in enumerate(ps.probes)]
    settings = scoring.Settings("retrieval", rule="rouge1_recall")
    prof = scoring.build_profile(lm, ps, results, settings)
    assert [p["counted"] for p in prof.data["probes"]] == [True, False]
    assert prof.query_scores().tolist() == [[1.0] * 4] * 3  # mean over the answered probe only
    unfiltered = scoring.build_profile(lm, ps, results, scoring.Settings("retrieval", filter_probes=False,
                                                                         rule="rouge1_recall"))
    assert unfiltered.query_scores().tolist() == [[1.5] * 4] * 3


def test_no_answered_probe_counts_every_probe_and_says_so(lm):
    ps = probes.build_probe_set("retrieval", [200], 2, seed=0)
    prof = scoring.score(lm, ps, "retrieval", probes.Haystack(0))
    assert prof.data["probe_set"]["successes"] == 0  # a random tiny model answers nothing
    assert prof.data["probe_set"]["counted"] == 2
    assert "none was answered" in prof.data["method"]["params"]["counted_probes"]


def _valid(lm):
    return json.loads(json.dumps(_run(lm).data))


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(schema_version=99), "newer than this headprof"),
    (lambda d: d.pop("scores"), "missing 'scores'"),
    (lambda d: d["scores"]["query"].pop(), "list of 3 layers"),
    (lambda d: d["scores"]["kv"]["mean"][1].append(0.0), r"scores.kv.mean\[1\] must hold 2 heads"),
    (lambda d: d["probes"][0]["scores"][0].__setitem__(0, "x"), "not a finite number"),
    (lambda d: d["model"].update(num_kv_heads=3), "impossible head layout"),
])
def test_validation_names_the_first_problem(lm, tmp_path, mutate, message):
    d = _valid(lm)
    mutate(d)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ProfileError, match=message):
        profile.load(p)


def test_load_errors(tmp_path):
    with pytest.raises(ProfileError, match="not found"):
        profile.load(tmp_path / "none.json")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        profile.load(tmp_path / "c.json")


def test_save_never_overwrites_without_force(lm, tmp_path):
    prof = _run(lm)
    p = tmp_path / "p.json"
    p.write_text("precious")
    with pytest.raises(OutputError, match="--force"):
        profile.save(prof, p)
    assert p.read_text() == "precious"
    profile.save(prof, p, force=True)
    assert profile.load(p).data["schema_version"] == 1
    assert [f.name for f in tmp_path.iterdir()] == ["p.json"]  # no temp files left behind


def _fake_runs(monkeypatch, answered):
    """Probes succeed when `answered(probe)`; each scores its own constant, so counting shows in the mean."""
    def run_probes(lm, work, s, on_done):
        for probe, _ in work:
            on_done({"id": probe.id, "success": answered(probe), "metric": 1.0, "response": "", "tokens": 1,
                     "answer_span": [0, 1], "scores": [[float(len(probe.id))] * 4] * 3})

    monkeypatch.setattr(scoring, "run_probes", run_probes)


def test_min_answered_draws_rounds_until_reached(lm, monkeypatch):
    _fake_runs(monkeypatch, lambda p: p.id.endswith(("-R1", "-R2")))  # round 0 answers nothing
    ps = probes.build_probe_set("r2", [200], 2, seed=0)
    prof = scoring.score(lm, ps, scoring.Settings("r2", min_answered=3, keep_chance=True), probes.Haystack(0))
    d = prof.data["probe_set"]
    assert d["rounds"] == 3 and d["count"] == 6 and d["successes"] == 4 and d["counted"] == 4
    assert d["target"] == {"min_answered": 3, "max_drawn": 18, "reached": True, "drawing": scoring.DRAWING_RULE}
    assert "warnings" not in prof.data
    assert sum(f["answered"] for f in d["by_family"].values()) == 4
    assert all(f["chance"] == round(1 / 3, 4) for f in d["by_family"].values())
    assert prof.query_scores()[0, 0] == len("r2-L200-D000-R1")  # only answered probes counted


def test_min_answered_stops_at_the_cap_and_says_so(lm, monkeypatch):
    _fake_runs(monkeypatch, lambda p: False)
    ps = probes.build_probe_set("r2", [200], 2, seed=0)
    prof = scoring.score(lm, ps, scoring.Settings("r2", min_answered=5, max_drawn=5), probes.Haystack(0))
    assert prof.data["probe_set"]["count"] == 6  # whole rounds, while fewer than the cap were drawn
    assert prof.data["probe_set"]["target"]["reached"] is False
    assert "only 0 of the 5 counted probes" in prof.data["warnings"][0]


RATES = {"disambiguation": lambda i: True, "two-hop": lambda i: i % 5 == 0, "comparison": lambda i: False,
         "paper": lambda i: False}


def _by_kind(monkeypatch):
    """Disambiguation always answered, two-hop one in five (below chance), comparison and paper never."""
    def answered(p):
        return RATES[p.kind](int(p.id.split("-D")[1][:3]))

    _fake_runs(monkeypatch, answered)


def test_families_at_chance_are_reported_and_not_counted(lm, monkeypatch):
    _by_kind(monkeypatch)
    ps = probes.build_probe_set("r2", [200], 60, seed=0)
    prof = scoring.score(lm, ps, scoring.Settings("r2"), probes.Haystack(0))
    fams = prof.data["probe_set"]["by_family"]
    assert fams["disambiguation"]["above_chance"] and not fams["disambiguation"]["left_out_at_chance"]
    assert fams["two-hop"]["answered"] > 0 and fams["two-hop"]["left_out_at_chance"]
    assert fams["two-hop"]["interval"][0] <= 1 / 3 < fams["disambiguation"]["interval"][0]
    assert fams["two-hop"]["counted"] == 0 and fams["disambiguation"]["counted"] == fams["disambiguation"]["drawn"]
    assert any(w.startswith("two-hop:") and "not clearly above chance" in w for w in prof.data["warnings"])
    assert not any(w.startswith("comparison") for w in prof.data["warnings"])  # nothing answered: nothing left out
    kept = scoring.score(lm, ps, scoring.Settings("r2", keep_chance=True), probes.Haystack(0))
    assert kept.data["probe_set"]["counted"] == kept.data["probe_set"]["successes"] > prof.data["probe_set"]["counted"]
    assert kept.data["method"]["params"]["keep_chance_families"] is True


def test_rounds_stop_drawing_families_that_stay_at_chance(lm, monkeypatch):
    _by_kind(monkeypatch)
    ps = probes.build_probe_set("r2", [200], 60, seed=0)
    prof = scoring.score(lm, ps, scoring.Settings("r2", min_answered=40), probes.Haystack(0))
    later = [r for r in prof.data["probes"] if "-R" in r["id"]]
    assert later and {r["kind"] for r in later} == {"disambiguation"}
    d = prof.data["probe_set"]
    assert d["counted"] >= 40 and d["target"]["reached"] and d["rounds"] == 1 + len(later) // 60


def test_teacher_forced_counts_every_probe(lm):
    ps = probes.build_probe_set("r2", [200], 2, seed=0)
    prof = scoring.score(lm, ps, scoring.Settings("r2", teacher_forced=True), probes.Haystack(0))
    params = prof.data["method"]["params"]
    assert params["teacher_forced"] and "teacher-forced" in params["counted_probes"]
    assert prof.data["probe_set"]["counted"] == 2
    gold = [lm.tokenizer.decode(scoring.forced_tokens(lm.tokenizer, p.answer)).strip() for p in ps.probes]
    assert [p["response"] for p in prof.data["probes"]] == gold


def test_few_answered_probes_are_flagged(lm, monkeypatch):
    ps = probes.build_probe_set("r2", [200], 2, seed=0)
    _fake_runs(monkeypatch, lambda p: p.id.endswith("D000"))
    prof = scoring.score(lm, ps, scoring.Settings("r2", keep_chance=True), probes.Haystack(0))
    assert prof.data["probe_set"]["counted"] == 1 and "only 1 of 2 probes" in prof.data["warnings"][0]
    _fake_runs(monkeypatch, lambda p: False)
    prof = scoring.score(lm, ps, scoring.Settings("r2", keep_chance=True), probes.Haystack(0))
    assert "every probe was counted" in prof.data["warnings"][0]
    prof = scoring.score(lm, ps, scoring.Settings("r2", filter_probes=False), probes.Haystack(0))
    assert "warnings" not in prof.data  # the user asked for every probe


def test_older_profiles_are_rescored_with_the_rules_they_record():
    old = {"decode_steps": "answer tokens + 10", "margin": 10, "success_metric": "answer_not_distractor",
           "chat_template": True, "filter": True, "teacher_forced": False}
    s = scoring.Settings.from_params("r2", old)
    assert (s.span, s.margin, s.rule, s.keep_chance) == ("value", 10, "answer_not_distractor", True)
    new = scoring.Settings("r2", max_new_tokens=40)
    ps = probes.build_probe_set("r2", [200], 2, seed=0)
    back = scoring.Settings.from_params("r2", new.params(ps))
    assert (back.span, back.margin, back.max_new_tokens, back.rule, back.keep_chance) == ("fact", None, 40,
                                                                                          "answer_f1", False)


SHIPPED = sorted(profile.SCHEMA_PATH.parent.glob("profiles/*/*.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_profile_loads_validates_and_records_its_rules(path):
    prof = profile.load(path)
    jsonschema.validate(prof.data, json.loads(profile.SCHEMA_PATH.read_text()))
    params = prof.data["method"]["params"]
    settings = scoring.Settings.from_params(prof.method, params)  # what `check` re-scores with
    assert settings.rule in (None, *scoring.answers.RULES)
    counted = [r for r in prof.data["probes"] if r["counted"]]
    assert len(counted) == prof.data["probe_set"]["counted"] >= 30  # each shipped profile rests on 30+ probes
    if "span" in params:  # made with the faithful rules: every counted probe was answered, above chance
        assert params["span"] == "fact" and params["success_metric"] == "answer_f1"
        assert all(r["success"] for r in counted)
        assert all(f["above_chance"] for f in prof.data["probe_set"]["by_family"].values() if f["counted"])
