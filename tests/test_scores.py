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
        fast_response, fast = score_probe(lm, RenderedProbe(ids, span, ""), method, margin=6)
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
    _, fast = score_probe(lm, RenderedProbe(ids, (0, len(ids)), ""), "retrieval", margin=8)
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
    assert scores.answer_check("retrieval", "It is under the blue flowerpot.", "under the blue flowerpot")[0]
    assert not scores.answer_check("retrieval", "under a tree", "under the blue flowerpot")[0]
    assert scores.answer_check("r2", "Seashells.", "seashells") == (True, 1.0)
    ok, f1 = scores.answer_check("r2", "Mara collects seashells.", "seashells")  # P 1/3, R 1
    assert not ok and f1 == pytest.approx(0.5)
    assert scores.answer_check("r2", "She collects seashells", "seashells")[0] is False
    assert scores.answer_check("r2", "seashells, I think", "seashells")[1] == pytest.approx(0.5)
    assert not scores.answer_check("r2", "glass marbles", "seashells")[0]
