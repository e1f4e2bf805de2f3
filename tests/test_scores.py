import numpy as np
import pytest
import torch
from fakes import loaded
from tiny import ARCHS

from headprof import scores
from headprof.probes import RenderedProbe
from headprof.reference import naive_score_probe
from headprof.scoring import score_probe


def _prompt(seed: int, length: int = 60) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (length,), generator=g).tolist()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["retrieval", "r2"])
def test_scores_equal_naive_eager_computation(arch, method):
    lm = loaded(arch)
    total = np.zeros((3, 4))
    for seed in range(3):
        ids = _prompt(seed)
        # make the answer span tokens the ones the model tends to emit, so retrieval hits happen
        span = (20, 26)
        fast_response, fast, _ = score_probe(lm, RenderedProbe(ids, span, ""), method, margin=6)
        gen, slow = naive_score_probe(lm, ids, span, method, margin=6)
        assert fast_response == lm.tokenizer.decode(gen)
        np.testing.assert_allclose(fast, slow, atol=1e-6)
        total += slow
    if method == "r2":  # the comparison is not vacuous: r2 always puts some weight on the span
        assert total.sum() > 0


def test_retrieval_score_counts_copy_hits():
    lm = loaded("llama")
    ids = _prompt(5)
    _, naive = naive_score_probe(lm, ids, (0, len(ids)), "retrieval", margin=8)
    _, fast, _ = score_probe(lm, RenderedProbe(ids, (0, len(ids)), ""), "retrieval", margin=8)
    np.testing.assert_allclose(fast, naive, atol=1e-9)
    assert naive.sum() > 0  # some head copied a prompt token: the test exercises real hits


def test_step_functions_by_hand():
    tokens = torch.tensor([5, 6, 7, 8, 9])
    top_idx = torch.tensor([[[2, 0]], [[3, 1]]])  # 2 layers, 1 head, k=2
    top_vals = torch.tensor([[[0.6, 0.3]], [[0.5, 0.4]]])
    # span covers positions 2..3; generated token 7 matches position 2 only
    r = scores.retrieval_step(top_idx, tokens, 7, (2, 4))
    assert r.tolist() == [[0.5], [0.0]]
    r2 = scores.r2_step(top_vals, top_idx, (2, 4))
    assert torch.allclose(r2, torch.tensor([[0.3], [0.25]]))


def test_answer_checks():
    assert scores.answer_check("rouge1_recall", "It is under the blue flowerpot.", "under the blue flowerpot")[0]
    assert not scores.answer_check("rouge1_recall", "under a tree", "under the blue flowerpot")[0]
    assert scores.answer_check("token_f1", "Seashells.", "seashells") == (True, 1.0)
    ok, f1 = scores.answer_check("token_f1", "Mara collects seashells.", "seashells")  # P 1/3, R 1
    assert not ok and f1 == pytest.approx(0.5)
    assert scores.answer_check("token_f1", "She collects seashells", "seashells")[0] is False
    assert scores.answer_check("token_f1", "seashells, I think", "seashells")[1] == pytest.approx(0.5)
    assert not scores.answer_check("token_f1", "glass marbles", "seashells")[0]
    assert scores.answer_check("token_f1", "Seashells.", "seashells") == (True, 1.0)


def test_answer_not_distractor_rule():
    check = scores.answer_not_distractor
    # a correct sentence passes (token F1 rejected it: 0.36)
    assert check("The younger of Emeka and Greta collect tin soldiers.", "tin soldiers", ["glass marbles"]) == 1.0
    assert check("tin soldiers and glass marbles", "tin soldiers", ["glass marbles"]) == 0.0  # names both
    assert check("glass marbles", "tin soldiers", ["glass marbles", "seashells"]) == 0.0
    assert check("tin", "tin soldiers", ["glass marbles"]) == 0.0  # half an answer
    # words shared by answer and distractor, and articles, do not count against the response
    assert check("Port Elsworth, of course", "Port Elsworth", ["Kestrel Bay", "the Port Royal"]) == 1.0
    assert scores.answer_check("answer_not_distractor", "It is the cello.", "cello", ["harp"]) == (True, 1.0)
    with pytest.raises(ValueError):
        scores.answer_check("nope", "", "x")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_new_families_and_teacher_forcing_equal_the_naive_computation(arch):
    from dataclasses import replace

    from tiny import char_tokenizer

    from headprof import probes
    from headprof.haystack import Haystack
    from headprof.scoring import forced_tokens

    lm = replace(loaded(arch), tokenizer=char_tokenizer())
    ps = probes.build_probe_set("r2", [400], 8, seed=2)
    assert {p.kind for p in ps.probes} == set(probes.R2_FAMILIES)
    weights = {"r2": 0.0, "retrieval": 0.0}
    for p in ps.probes[:4]:
        r = probes.render(p, lm.tokenizer, Haystack(0), chat_template=False)
        _, fast, _ = score_probe(lm, r, "r2", margin=3)
        _, slow = naive_score_probe(lm, r.input_ids, r.answer_span, "r2", margin=3)
        np.testing.assert_allclose(fast, slow, atol=1e-5)
        gold = forced_tokens(lm.tokenizer, p.answer)
        for method in ("r2", "retrieval"):
            response, fast, followed = score_probe(lm, r, method, forced=gold)
            greedy, slow = naive_score_probe(lm, r.input_ids, r.answer_span, method, margin=0, forced=gold)
            np.testing.assert_allclose(fast, slow, atol=1e-5)
            assert followed == (greedy == gold)
            assert response == lm.tokenizer.decode(gold).strip()
            weights[method] += slow.sum()
    assert weights["r2"] > 0  # the comparison is not vacuous
