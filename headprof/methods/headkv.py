"""HeadKV (Fu et al. 2024, arXiv 2410.19258): budgets split by a head profile's importance scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from headprof.defaults import BETA
from headprof.methods.allocate import BudgetError, capacity, prefix_budget, share
from headprof.methods.base import Method, Scorer, pooled_window, profile_scores, register


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
@dataclass
class HeadKV(Method):
    name = "headkv"
    rank = 50
    summary = ("Eq. 4: b - b/beta for every head plus a share of the pool (b/beta) x heads by the profile's "
               "KV-head scores")
    needs_profile = True
    hard = {"beta": 1.01, "reduction": "max", "window": 4}

    # a Profile (its KV-head scores, reduced over each group by `reduction`) or [layer, kv_head] scores
    profile: Any = None
    beta: float = BETA  # 1: every head keeps b; larger: more of the budget follows the profile
    reduction: str = "mean"  # how a KV head's score comes from its query heads': mean or max
    scorer: Scorer = pooled_window  # what chooses positions inside each head's budget

    def __post_init__(self) -> None:
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")
        if self.reduction not in ("mean", "max"):
            raise ValueError(f"reduction must be mean or max, got {self.reduction}")

    def kv_scores(self) -> np.ndarray:
        return profile_scores(self)

    def allocate(self, budget, caps, compressible):
        return headkv(self.kv_scores(), budget, self.window, caps, compressible, self.beta)

    def score(self, plan, layer, probs):
        return self.scorer(self, plan, layer, probs)
