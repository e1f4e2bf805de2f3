"""Per-step head scores, answer checks and decode rules, against the naive computation."""

import numpy as np
import pytest
import torch
from fakes import loaded
from tiny import ARCHS

from headprof.models import end_tokens
from headprof.probing import answers, families
from headprof.probing.decode import Decoder, score_probe
from headprof.probing.families.base import r2_step, retrieval_step
from headprof.probing.probes import RenderedProbe
from headprof.probing.reference import naive_scores

RETRIEVAL, R2 = families.get("retrieval"), families.get("disambiguation")


def _prompt(seed: int, length: int = 60) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (length,), generator=g).tolist()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", [RETRIEVAL, R2])
def test_scores_equal_naive_eager_computation(arch, family):
    lm = loaded(arch)
    total = np.zeros((3, 4))
    for seed in range(3):
        ids = _prompt(seed)
        span = (20, 26)
        run = score_probe(lm, RenderedProbe(ids, span, ""), family, Decoder(lm.tokenizer, end_tokens(lm), 6))
        gen, slow = naive_scores(lm, ids, span, family.protocol == "r2", max_steps=6)
        assert run.response == lm.tokenizer.decode(gen) and run.steps == 6 and run.stop == "cap"
        np.testing.assert_allclose(run.scores, slow, atol=1e-6)
        total += slow
    if family.protocol == "r2":  # the comparison is not vacuous: r2 always puts some weight on the span
        assert total.sum() > 0


def test_retrieval_score_counts_copy_hits():
    lm = loaded("llama")
    ids = _prompt(5)
    _, naive = naive_scores(lm, ids, (0, len(ids)), r2=False, max_steps=8)
    run = score_probe(lm, RenderedProbe(ids, (0, len(ids)), ""), RETRIEVAL, Decoder(lm.tokenizer, set(), 8))
    np.testing.assert_allclose(run.scores, naive, atol=1e-9)
    assert naive.sum() > 0  # some head copied a prompt token: the test exercises real hits


def test_step_functions_by_hand():
    tokens = torch.tensor([5, 6, 7, 8, 9])
    top_idx = torch.tensor([[[2, 0]], [[3, 1]]])  # 2 layers, 1 head, k=2
    top_vals = torch.tensor([[[0.6, 0.3]], [[0.5, 0.4]]])
    # span covers positions 2..3; generated token 7 matches position 2 only
    assert retrieval_step(top_idx, tokens, 7, (2, 4)).tolist() == [[0.5], [0.0]]
    assert torch.allclose(r2_step(top_vals, top_idx, (2, 4)), torch.tensor([[0.3], [0.25]]))
    assert RETRIEVAL.topk(7) == 1 and R2.topk(7) == 7


class _Tok:
    """Token i decodes to WORDS[i]."""

    WORDS = ["\n", "Mara", " collects", " stamps", ".", "<eos>", ":"]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.WORDS[i] for i in ids)


@pytest.mark.parametrize("tokens,kwargs,generated,reason", [
    ([1, 2, 3, 4, 0], {}, [1, 2, 3, 4, 0], "line"),  # the answer's line ends
    ([0, 1, 2, 0], {}, [0, 1, 2, 0], "line"),  # a leading newline does not end an empty answer
    ([1, 6, 0, 3, 0], {}, [1, 6, 0, 3, 0], "line"),  # "Mara:" announces the answer on the next line
    ([1, 2, 5], {}, [1, 2], "eos"),
    ([1, 2, 3, 4], {"cap": 3}, [1, 2, 3], "cap"),
    ([0, 1], {"official": True, "newlines": frozenset({0})}, [0], "line"),  # the scripts' newline ids
    ([0, 1, 2], {"official": True, "cap": 3}, [0, 1, 2], "cap"),  # ... and no other newline
    ([1, 2, 5], {"official": True}, [1, 2, 5], "eos"),  # ... keep the end token in their output
    ([1, 2, 3, 4], {"official": True, "answer_tokens": 2}, [1, 2], "answer"),  # HeadKV-R2: answer length
])
def test_decoder_rules(tokens, kwargs, generated, reason):
    d = Decoder(_Tok(), {5}, **{"cap": 50, **kwargs})
    out: list[int] = []
    for t in tokens:
        if d.done(t, out):
            break
    assert out == generated and d.reason == reason


def test_answer_f1_accepts_what_a_reader_would():
    ok = lambda r, a, d=(): answers.check("answer_f1", r, a, "", d)[0]  # noqa: E731
    assert ok("Stamps.", "postage stamps")  # a short answer (F1 0.67)
    assert ok("Kofi, who is 45 years old, collects seashells", "seashells", ["old maps", "tin soldiers"])
    assert ok("The oldest is Ines (45), so the answer is: she grows strawberries.", "strawberries", ["garlic"])
    assert ok("Strawberry", "strawberries") and ok("tomato", "tomatoes")  # singular and plural
    assert ok("It is in Port Elsworth, of course", "Port Elsworth", ["Kestrel Bay"])
    assert not ok("Mara collects stamps and Ines collects maps", "postage stamps", ["old maps"])  # both named
    assert not ok("glass marbles", "tin soldiers", ["glass marbles", "seashells"])
    assert not ok("Ines hid the spare key.", "under the blue flowerpot")  # restates without the value
    assert not ok("The code for the lock is 472", "4729")  # cut short
    assert not ok("", "cello")


def test_official_rules():
    # HeadKV-R2: QA-F1 with SQuAD normalisation against the whole answer
    f1 = answers.check("qa_f1", "The answer is seashells.", "seashells")[1]
    assert f1 == pytest.approx(0.5)  # "answer is seashells": P 1/3, R 1
    assert answers.check("qa_f1", "Seashells!", "the seashells") == (True, 1.0)
    # Retrieval_Head: ROUGE-1 recall of the correct-fact sentence
    assert answers.check("needle_rouge1_recall", "walk in Chaoyang Park and have Espresso", "", "take a walk in "
                         "Chaoyang Park and have a cup of Espresso")[0]
    assert not answers.check("needle_rouge1_recall", "go to the park", "", "take a walk in Chaoyang Park")[0]


def test_legacy_rules_stay_as_recorded():
    assert answers.check("token_f1", "Seashells.", "seashells") == (True, 1.0)
    ok, f1 = answers.check("token_f1", "Mara collects seashells.", "seashells")  # P 1/3, R 1
    assert not ok and f1 == pytest.approx(0.5)
    assert answers.check("rouge1_recall", "It is under the blue flowerpot.", "under the blue flowerpot")[0]
    check = answers.answer_not_distractor
    assert check("The younger of Emeka and Greta collect tin soldiers.", "tin soldiers", ["glass marbles"]) == 1.0
    assert check("tin soldiers and glass marbles", "tin soldiers", ["glass marbles"]) == 0.0
    with pytest.raises(Exception, match="unknown answer check 'nope'"):
        answers.check("nope", "", "x")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_families_and_teacher_forcing_equal_the_naive_computation(arch):
    from dataclasses import replace

    from tiny import char_tokenizer

    from headprof.probing import probes
    from headprof.probing.decode import forced_tokens
    from headprof.probing.haystack import Haystack

    lm = replace(loaded(arch), tokenizer=char_tokenizer())
    ps = probes.build_probe_set("r2", [400], 8, seed=2)
    assert {p.kind for p in ps.probes} == set(families.R2_FAMILIES)
    weights = {"r2": 0.0, "retrieval": 0.0}
    for p in ps.probes[:4]:
        fam = families.get(p.kind)
        r = probes.render(p, lm.tokenizer, Haystack(0), chat_template=False)
        assert r.answer_span[1] - r.answer_span[0] == len(p.fact)  # the correct-fact sentence, k = its length
        run = score_probe(lm, r, fam, Decoder(lm.tokenizer, set(), 3))
        _, slow = naive_scores(lm, r.input_ids, r.answer_span, True, max_steps=3)
        np.testing.assert_allclose(run.scores, slow, atol=1e-5)
        gold = forced_tokens(lm.tokenizer, p.answer)
        for f in (fam, RETRIEVAL):
            run = score_probe(lm, r, f, forced=gold)
            greedy, slow = naive_scores(lm, r.input_ids, r.answer_span, f.protocol == "r2", 0, forced=gold)
            np.testing.assert_allclose(run.scores, slow, atol=1e-5)
            assert run.followed == (greedy == gold)
            assert run.response == lm.tokenizer.decode(gold).strip()
            weights[f.protocol] += slow.sum()
    assert weights["r2"] > 0  # the comparison is not vacuous


@pytest.mark.parametrize("response,reference,want", [
    ("", "", 1.0), ("...", "...", 1.0),          # the same answer without words agrees, it does not score 0
    ("the blue flowerpot", "the blue flowerpot", 1.0),
    ("...", "", 0.0), ("blue pot", "the blue flowerpot", 0.4),
])
def test_agreement_with_the_full_cache_is_one_for_the_same_text(response, reference, want):
    assert answers.agreement(response, reference) == pytest.approx(want)
