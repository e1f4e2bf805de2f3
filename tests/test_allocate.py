import numpy as np
import pytest

from headprof.methods import allocate
from headprof.methods.adakv import adakv_layer
from headprof.methods.allocate import BudgetError
from headprof.methods.headkv import headkv
from headprof.methods.pyramidkv import pyramid


def _all(shape):
    return np.ones(shape, dtype=bool)


def test_headkv_total_floor_and_order():
    rng = np.random.default_rng(0)
    scores = rng.random((6, 4))
    b = headkv(scores, budget=72, window=8, prefix=10_000, compressible=_all((6, 4)), beta=1.2)
    assert b.sum() == 64 * 24  # rounding keeps the total exact
    floor = 64 - 64 / 1.2
    assert (b >= np.floor(floor)).all()
    # more important heads never get fewer tokens
    order = np.argsort(scores.ravel())
    assert (np.diff(b.ravel()[order]) >= 0).all()
    # Eq. 4 directly
    p = scores / scores.sum()
    expected = floor + p * (64 / 1.2) * 24
    assert np.abs(b - expected).max() <= 1


def test_headkv_beta_near_one_follows_scores_and_large_beta_is_nearly_uniform():
    scores = np.array([[1.0, 0.0, 0.0, 0.0]])
    # beta -> 1: the guaranteed floor b - b/beta -> 0, the whole pool follows the scores
    assert headkv(scores, 40, 8, 10_000, _all((1, 4)), beta=1.005).tolist() == [[128, 0, 0, 0]]
    # beta = 10: floor 28.8 each, pool 12.8 to head 0
    assert headkv(scores, 40, 8, 10_000, _all((1, 4)), beta=10).tolist() == [[41, 29, 29, 29]]


def test_surplus_goes_to_other_heads():
    scores = np.array([[10.0, 1.0, 1.0, 1.0]])
    b = headkv(scores, 58, 8, prefix=60, compressible=_all((1, 4)), beta=2)
    assert b[0, 0] == 60  # capped at the prefix
    assert b.sum() == 200  # nothing lost: 50 x 4


def test_cap_everything_when_budget_exceeds_prompt():
    b = headkv(np.ones((2, 2)), 500, 8, prefix=30, compressible=_all((2, 2)))
    assert (b == 30).all()


def test_sliding_layers_take_no_budget():
    comp = np.array([[True, True], [False, False], [True, True]])
    b = headkv(np.ones((3, 2)), 24, 8, 1000, comp)
    assert b[1].tolist() == [0, 0] and b.sum() == 16 * 4


def test_pyramid_decreases_with_depth_same_total():
    b = pyramid(72, 8, 10_000, _all((8, 2)))
    assert b.sum() == 64 * 16
    per_layer = b.sum(axis=1)
    assert (np.diff(per_layer) <= 0).all() and per_layer[0] > per_layer[-1]


def test_adakv_layer_pool():
    pooled = np.zeros((3, 100))
    pooled[0, :40] = 1.0  # head 0: 40 strong positions
    pooled[1, :] = 0.5  # head 1: uniformly medium; head 2: nothing
    b = adakv_layer(pooled, budget=28, window=8, prefix=100)
    # safeguard 20% of 20 = 4 each; the pool of 60 - 12 = 48 takes head 0's other 36, then 12 of head 1's
    assert b.tolist() == [40, 16, 4]


def test_share_is_exact():
    out = allocate.share(np.array([1.0, 1.0, 1.0]), 10, cap=100)
    assert out.sum() == 10 and sorted(out.tolist()) == [3, 3, 4]


@pytest.mark.parametrize("budget", [8, 4, 0])
def test_budget_must_exceed_window(budget):
    with pytest.raises(BudgetError, match="exceed"):
        allocate.uniform(budget, 8, 100, _all((1, 1)))
