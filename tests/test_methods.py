"""The registry is the one list of methods: the CLI, run, eval and the docs follow it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import loaded

from headprof import methods
from headprof.compressing import generation
from headprof.errors import HeadprofError, MethodError
from headprof.evaluation import evaluate

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_registered_method_is_documented_and_listed_in_errors():
    table = (DOCS / "run.md").read_text()
    for name in methods.names():
        assert f"| `{name}` |" in table, name
    with pytest.raises(MethodError) as e:
        methods.get("magic")
    assert all(n in str(e.value) for n in methods.names())
    assert methods.names()[0] == "full"


def test_a_new_method_is_one_class_and_runs_everywhere():
    @methods.register
    class Oldest(methods.Method):
        name = "oldest"
        summary = "the first b tokens"

        def choose(self, plan, layer, probs):
            return [torch.arange(int(b)) for b in plan.budgets[layer]]

    try:
        lm = loaded("llama")
        ids = torch.randint(0, 96, (60,), generator=torch.Generator().manual_seed(0)).tolist()
        r = generation.generate(lm, ids, methods.build("oldest", window=8), 20, max_new_tokens=3)
        assert r.budgets == [[12, 12]] * 3 and r.kv_bytes <= 1.05 * r.kv_bytes_ideal
        assert evaluate.parse_methods("full,oldest", {}) == ["full", "oldest"]
        assert methods.parse_spec("headkv-r2").profile == "r2" and methods.parse_spec("oldest").profile is None
    finally:
        methods.REGISTRY.pop("oldest")


def test_adaptive_budgets_are_reported_without_mutating_the_plan():
    lm = loaded("llama")
    ids = torch.randint(0, 96, (80,), generator=torch.Generator().manual_seed(1)).tolist()
    r = generation.generate(lm, ids, methods.build("adakv", window=8), 24, max_new_tokens=3)
    kept = np.array(r.budgets)
    assert kept.sum() == 3 * 2 * 16  # each layer's pool (b x heads) is spent exactly
    assert r.kv_entries == r.kv_entries_ideal


# Every method at its defaults and at its own demanding setting (`hard`), as kvpress's press tests do.
TABLE = [(n, {}) for n in methods.names()] + [(n, methods.REGISTRY[n].hard) for n in methods.names()
                                              if methods.REGISTRY[n].hard]


@pytest.mark.parametrize("name,options", TABLE, ids=[f"{n}-{'hard' if o else 'default'}" for n, o in TABLE])
def test_every_method_spends_its_budget_and_matches_full_above_the_prompt(name, options):
    lm = loaded("llama")
    lay = lm.info.layout
    ids = torch.randint(0, 96, (80,), generator=torch.Generator().manual_seed(2)).tolist()
    scores = np.random.default_rng(3).random((lay.num_layers, lay.num_kv_heads)) ** 3
    m = methods.resolve(methods.build(name, **options), scores) if not methods.REGISTRY[name].needs_profile \
        else methods.build(name, profile=scores, **options)
    full = generation.generate(lm, ids, "full", 0, max_new_tokens=3)
    above = generation.generate(lm, ids, m, 200, max_new_tokens=3)
    assert above.tokens == full.tokens
    if not m.compresses:
        return
    r = generation.generate(lm, ids, m, 24, max_new_tokens=3)
    kept = np.array(r.budgets)
    budget = (24 - m.window) * lay.num_layers * lay.num_kv_heads
    if m.cache_kind == "split" and m.full is None:  # whole heads and equal streaming heads: the budget or a head less
        assert budget - (80 - m.window) < kept.sum() <= budget
    elif m.cache_kind == "split":  # a share of heads kept whole, set by hand
        assert (kept == 80 - m.window).sum() == round(m.full * kept.size)
    else:
        assert kept.sum() == budget  # the whole budget, no more
    assert kept.min() >= 0 and r.kv_entries == r.kv_entries_ideal < full.kv_entries
    assert methods.build(name, **options).params() == options  # what differs from the defaults, as labels say


def test_specs_set_options_and_name_profiles():
    spec = methods.parse_spec("headkv:profile=r2,beta=1.5,window=8")
    assert (spec.name, spec.profile, spec.options) == ("headkv", "r2", {"beta": 1.5, "window": 8})
    assert methods.parse_spec("headkv-r2") == methods.Spec("headkv-r2", "headkv", {}, "r2")
    m = spec.build({"r2": np.ones((3, 2))}, beta=3.0, kernel=5)  # the spec's beta wins; kernel is a default
    assert (m.beta, m.window, m.kernel) == (1.5, 8, 5) and m.profile.shape == (3, 2)
    assert methods.parse_spec("adakv:safeguard=0.5").build(beta=2.0).safeguard == 0.5  # beta: not an adakv option
    assert evaluate.method_labels("full,headkv:profile=r2,beta=1.5,snapkv") == ["full", "headkv:profile=r2,beta=1.5",
                                                                                 "snapkv"]
    for bad, message in [("magic", "unknown method 'magic'"), ("headkv:gamma=2", "headkv has no option 'gamma'"),
                         ("snapkv:window=x", "expected an integer"), ("snapkv:window", "not KEY=VALUE"),
                         ("headkv-lite:beta=2", "unknown method")]:
        with pytest.raises(MethodError, match=message):
            methods.parse_spec(bad)
    for bad, message in [("adakv:safeguard=2", "safeguard must lie in"), ("headkv:profile=r2,beta=0.5", "beta must be"),
                         ("headkv:profile=lite", "profile 'lite', which is not loaded")]:
        with pytest.raises(MethodError, match=message):
            methods.parse_spec(bad).build({"r2": np.ones((3, 2))})
    with pytest.raises(HeadprofError, match="needs a profile"):
        evaluate.parse_methods("full,headkv", {"r2": None})


def test_a_profile_named_by_the_method_must_exist():
    from headprof import api
    from headprof.errors import ProfileError

    lm = loaded("llama")
    with pytest.raises(ProfileError, match="no shipped profile 'lite' for tiny-llama"):
        api.generate(lm, list(range(40)), "headkv-lite", 24, max_new_tokens=2)
    report = api.generate(lm, list(range(40)), methods.build("snapkv", window=4, kernel=1), 24, max_new_tokens=2)
    assert report.method == "snapkv" and report.window == 4 and report.kernel == 1  # a built method: its own params


def test_spread_hands_a_score_on_to_the_positions_after_it():
    import torch

    from headprof.methods.base import pooled_scores

    probs = torch.zeros(1, 2, 2, 12)  # 2 query heads (one KV head), window 2, prefix 10
    probs[0, :, :, 3] = 1.0
    probs[0, :, :, 8] = 0.5
    plain = pooled_scores(probs, 2, 1)
    spread = pooled_scores(probs, 2, 1, spread=3)
    assert plain[0].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0.5, 0]
    assert spread[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0.5, 0.5]  # 8's run is cut at the prefix's end


def test_decay_hands_a_score_on_fading_so_a_peak_reaches_as_far_as_it_stands_out():
    from headprof.methods.base import pooled_scores

    probs = torch.full((1, 2, 2, 12), 0.01)  # background 0.01; window 2, prefix 10
    probs[0, :, :, 1] = 1.0  # a strong peak
    probs[0, :, :, 7] = 0.02  # a weak one
    faded = pooled_scores(probs, 2, 1, decay=0.5)[0]
    expected = [0.01, 1, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.02, 0.01, 0.01]
    assert torch.allclose(faded, torch.tensor(expected), rtol=1e-5)
    # the strong peak outshines the background for 6 positions (the weak one at 7 wins there), the weak one for 1
    plain = [0.01, 1] + [0.01] * 5 + [0.02] + [0.01] * 2
    assert pooled_scores(probs, 2, 1, decay=0.0)[0].tolist() == pytest.approx(plain)
    for bad in ("decay=1", "decay=-0.1", "spread=-1"):
        with pytest.raises(MethodError, match=bad.split("=")[0]):
            methods.resolve(f"snapkv:{bad}")
