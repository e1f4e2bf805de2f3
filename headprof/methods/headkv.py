"""HeadKV (Fu et al. 2024, arXiv 2410.19258): budgets split by a head profile's importance scores."""

from __future__ import annotations

import numpy as np

from headprof.allocate import BudgetError, capacity, prefix_budget, share
from headprof.defaults import BETA
from headprof.methods.base import Method, register


def headkv(scores: np.ndarray, budget: int, window: int, prefix: int | np.ndarray, compressible: np.ndarray,
           beta: float = BETA) -> np.ndarray:
    """Eq. 4: every head keeps b - b/beta; a pool of (b/beta) x heads is split by importance."""
    if beta < 1:
        raise BudgetError(f"beta must be >= 1, got {beta}")
    b = prefix_budget(budget, window)
    heads = int(compressible.sum())
    s = np.clip(np.asarray(scores, dtype=float)[compressible], 0, None)
    p = s / s.sum() if s.sum() > 0 else np.full(heads, 1.0 / max(heads, 1))
    floor = b - b / beta
    weights = floor + p * (b / beta) * heads  # real-valued budgets; `share` rounds them exactly
    out = np.zeros(compressible.shape, dtype=np.int64)
    out[compressible] = share(weights, b * heads, capacity(prefix, compressible)[compressible])
    return out


@register
class HeadKV(Method):
    name = "headkv"
    rank = 50
    summary = ("Eq. 4: b - b/beta for every head plus a share of the pool (b/beta) x heads by the profile's "
               "KV-head scores")
    needs_profile = True

    def allocate(self, budget, window, caps, compressible, kv_scores=None, beta=BETA):
        if kv_scores is None:
            raise BudgetError("headkv needs a profile")
        return headkv(kv_scores, budget, window, caps, compressible, beta)
