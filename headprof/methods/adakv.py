"""Ada-SnapKV (Feng et al. 2024): a layer's budget goes to its highest-scoring (head, position) pairs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headprof.methods.allocate import prefix_budget
from headprof.methods.base import Method, Scorer, pooled_window, register, top_positions

SAFEGUARD = 0.2


def adakv_layer(pooled: np.ndarray, budget: int, window: int, prefix: int, safeguard: float = SAFEGUARD) -> np.ndarray:
    """Each head keeps a safeguard share of b; the rest of the layer's pool (b x heads) goes to the layer's
    highest-scoring (head, position) pairs."""
    b = prefix_budget(budget, window)
    heads, n = pooled.shape
    floor = min(int(safeguard * b), prefix)
    pool = min(b * heads, heads * prefix) - floor * heads
    ranked = np.sort(np.asarray(pooled, dtype=float), axis=1)[:, ::-1][:, floor:]  # what is left per head
    flat = ranked.ravel()
    top = np.argpartition(-flat, pool - 1)[:pool] if 0 < pool < flat.size else np.arange(flat.size if pool else 0)
    return floor + np.bincount(top // max(n - floor, 1), minlength=heads).astype(np.int64)


@register
@dataclass
class AdaKV(Method):
    name = "adakv"
    rank = 40
    summary = (f"per layer, a pool of b x heads: {SAFEGUARD:.0%} of b guaranteed to each head, the rest to the "
               "layer's highest-scoring (head, position) pairs")
    hard = {"safeguard": 0.0, "window": 4}

    safeguard: float = SAFEGUARD  # share of b every head keeps whatever the scores
    scorer: Scorer = pooled_window  # what ranks (head, position) pairs; SnapKV's pooled window attention

    def __post_init__(self) -> None:
        if not 0 <= self.safeguard <= 1:
            raise ValueError(f"safeguard must lie in [0, 1], got {self.safeguard}")

    def allocate(self, budget, caps, compressible):
        super().allocate(budget, caps, compressible)  # validates the budget
        return np.zeros(compressible.shape, dtype=np.int64)  # decided per layer, from the window (choose)

    def score(self, plan, layer, probs):
        return self.scorer(self, plan, layer, probs)

    def choose(self, plan, layer, probs):
        scores = self.score(plan, layer, probs)
        budgets = adakv_layer(scores.float().cpu().numpy(), plan.budget, self.window,
                              plan.prefix - plan.first_candidate(layer), self.safeguard)
        return [top_positions(scores[h], int(budgets[h])) for h in range(scores.shape[0])]
