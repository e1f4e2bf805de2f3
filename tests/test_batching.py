"""Probes scored in batches (left-padded, decoded in lockstep) score what they score one at a time."""

import json

import numpy as np
import pytest
import torch
from fakes import loaded
from tiny import ARCHS, save
from typer.testing import CliRunner

from headprof import models
from headprof.cli import app
from headprof.errors import ProbeError
from headprof.probing import families, probes, scoring
from headprof.probing.decode import Decoder, ProbeJob, score_batch, score_probe
from headprof.probing.probes import RenderedProbe

RETRIEVAL, R2 = families.get("retrieval"), families.get("disambiguation")


def _jobs(lm, forced: bool = False) -> list[ProbeJob]:
    """Four prompts of different lengths (so the batch is padded), both scoring methods, different caps."""
    jobs = []
    for seed, length in enumerate([40, 61, 55, 33]):
        ids = torch.randint(0, 96, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
        family = R2 if seed % 2 else RETRIEVAL
        span = (10, 17 + seed) if family is R2 else (0, length)  # retrieval: hits anywhere in the prompt
        gold = ids[5:8 + seed] if forced else None  # copying prompt tokens: a head can retrieve them
        jobs.append(ProbeJob(RenderedProbe(ids, span, ""), family, Decoder(lm.tokenizer, set(), 4 + seed), gold))
    return jobs


@pytest.mark.parametrize("arch", [*ARCHS, "llama-mha"])
@pytest.mark.parametrize("forced", [False, True])
def test_a_batch_scores_what_each_probe_scores_alone(arch, forced):
    lm = loaded(arch)
    jobs = _jobs(lm, forced)
    alone = [score_probe(lm, j.rendered, j.family, Decoder(lm.tokenizer, set(), j.decoder.cap), j.forced)
             for j in jobs]
    together = score_batch(lm, _jobs(lm, forced))
    for a, b in zip(alone, together, strict=True):
        assert (a.response, a.stop, a.steps, a.followed) == (b.response, b.stop, b.steps, b.followed)
        np.testing.assert_allclose(b.scores, a.scores, atol=1e-5)
    assert all(a.scores.sum() > 0 for a in alone[1::2])  # r2 probes put weight on their spans: not vacuous
    assert len({a.steps for a in alone}) == 4  # each probe stopped by its own rule


def test_finished_probes_are_handed_over_before_the_batch_ends():
    lm = loaded("llama")
    heard: list[tuple[int, int]] = []
    runs = score_batch(lm, _jobs(lm), lambda i, run: heard.append((i, run.steps)))
    assert heard == [(0, 4), (1, 5), (2, 6), (3, 7)]  # in the order they stopped, each as it stopped
    assert [r.steps for r in runs] == [4, 5, 6, 7]


def test_an_empty_forced_answer_scores_nothing_in_a_batch():
    lm = loaded("llama")
    jobs = _jobs(lm, forced=True)
    jobs[2].forced = []
    runs = score_batch(lm, jobs)
    assert runs[2].steps == 0 and not runs[2].followed and runs[2].scores.sum() == 0
    assert runs[1].steps == 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save("gemma3", tmp_path_factory.mktemp("tiny") / "gemma3")


def _profile(tiny_dir, batch_size, **kw):
    lm = models.load(str(tiny_dir), device="cpu")
    ps = probes.build_probe_set("r2", [150, 200, 260], 3, seed=0)
    settings = scoring.Settings("r2", filter_probes=False, max_new_tokens=6)
    return scoring.score(lm, ps, settings, probes.Haystack(0), batch_size=batch_size, **kw)


def test_the_profile_does_not_depend_on_the_batch_size(tiny_dir):
    one, many = _profile(tiny_dir, 1), _profile(tiny_dir, 5)
    np.testing.assert_allclose(many.query_scores(), one.query_scores(), atol=1e-5)
    assert one.query_scores().sum() > 0
    assert [p["response"] for p in many.data["probes"]] == [p["response"] for p in one.data["probes"]]
    assert [p["id"] for p in many.data["probes"]] == [p["id"] for p in one.data["probes"]]  # the probe set's order
    assert one.data["environment"]["batch_size"] == 1 and many.data["environment"]["batch_size"] == 5
    assert many.data["method"] == one.data["method"] and many.data["probe_set"] == one.data["probe_set"]


def test_out_of_memory_halves_the_batch_and_keeps_finished_probes(tiny_dir, tmp_path, monkeypatch):
    real = scoring.score_batch
    sizes = []

    def tight(lm, jobs, on_done=None):  # memory for two probes: a larger batch finishes one, then fails
        sizes.append(len(jobs))
        if len(jobs) > 2:
            real(lm, jobs[:1], on_done)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(lm, jobs, on_done)

    monkeypatch.setattr(scoring, "score_batch", tight)
    notes = []
    partial = tmp_path / "p.json.partial.jsonl"
    prof = _profile(tiny_dir, 8, partial=partial, notice=notes.append)
    assert sizes[:2] == [8, 4] and max(sizes[2:]) == 2  # 8 and then 4 failed after one probe each
    assert notes == ["out of memory on 8 probes at once: halving the batch until it fits (finished probes are kept)"]
    rows = [json.loads(line)["id"] for line in partial.read_text().splitlines()[1:]]
    assert sorted(rows) == sorted(p["id"] for p in prof.data["probes"])  # every probe once: none lost or redone
    assert prof.data["environment"]["batch_size_after_out_of_memory"] == 2
    monkeypatch.setattr(scoring, "score_batch", real)
    np.testing.assert_allclose(prof.query_scores(), _profile(tiny_dir, 1).query_scores(), atol=1e-5)


def test_out_of_memory_on_a_single_probe_is_a_clear_error(tiny_dir, monkeypatch):
    def none_fits(lm, jobs, on_done=None):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(scoring, "score_batch", none_fits)
    with pytest.raises(ProbeError, match=r"out of memory scoring probe .* on its own: use shorter --lengths"):
        _profile(tiny_dir, 1)


def test_other_runtime_errors_are_not_taken_for_out_of_memory(tiny_dir, monkeypatch):
    def broken(lm, jobs, on_done=None):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(scoring, "score_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        _profile(tiny_dir, 4)


@pytest.mark.parametrize("size", ["0", "-3"])
def test_batch_size_below_one_is_refused(tiny_dir, tmp_path, size):
    r = CliRunner().invoke(app, ["score", str(tiny_dir), "--batch-size", size, "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == f"error: --batch-size must be at least 1, got {size}"
    assert not list(tmp_path.iterdir())


def test_a_batch_larger_than_the_round_uses_the_round(tiny_dir):
    prof = _profile(tiny_dir, 64)
    assert prof.data["probe_set"]["count"] == 9 and prof.data["environment"]["batch_size"] == 64


def test_a_decode_step_scores_the_whole_batch_in_one_call(monkeypatch):
    """No loop over probes per decoded token: one `step_rows` call per step, whatever the batch holds."""
    lm = loaded("llama")
    calls: list[int] = []
    real = families.step_rows

    def counted(retrieval, *args):
        calls.append(len(retrieval))
        return real(retrieval, *args)

    monkeypatch.setattr(families, "step_rows", counted)
    runs = score_batch(lm, _jobs(lm))
    assert len(calls) == max(r.steps for r in runs) == 7
    assert calls[0] == 4 and calls[-1] == 1  # all four probes at first, the last one alone at the end
