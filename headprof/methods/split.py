"""The full/streaming head split (RazorAttention, DuoAttention, RLKV) driven by a head profile.

The highest-scoring KV heads (the profile's KV-head scores, reduced over each GQA group by `reduction`) keep every
prompt and generated token; every other head keeps its first `sink` tokens and the most recent `recent` (the
observation window among them), evicting the oldest as each token is generated, so its memory stays constant
(`kv/split.py`, the rolling-window cache kind it runs on). Budgets are in the units of every other method: with
`full` unset, the share of full heads is what the budget pays for at prefill, so `eval --ratios` sets the split
beside HeadKV at equal KV (a full head holds the prompt, a streaming head sink + recent, cut to the budget where the
budget is smaller). Sliding-window layers stay as the model keeps them (their window bounds them already).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from headprof.methods.allocate import prefix_budget
from headprof.methods.base import Method, profile_scores, register
from headprof.methods.streaming import streaming_positions


@register
@dataclass
class Split(Method):
    name = "split"
    rank = 55
    summary = ("the profile's top KV heads keep every token, the others a sink and a rolling window of the most "
               "recent (RazorAttention / DuoAttention / RLKV)")
    needs_profile = True
    cache_kind = "split"
    compresses_sliding = False
    hard = {"full": 0.5, "sink": 0, "recent": 20}

    profile: Any = None  # a Profile (its KV-head scores, reduced by `reduction`) or [layer, kv_head] scores
    full: float | None = None  # share of KV heads kept whole, in (0, 1]; None: what the budget pays for
    sink: int = 4  # first tokens every streaming head keeps
    recent: int = 256  # most recent tokens every streaming head keeps (the observation window counts among them)
    reduction: str = "mean"

    def __post_init__(self) -> None:
        if self.full is not None and not 0 < self.full <= 1:
            raise ValueError(f"full must be in (0, 1], got {self.full}")
        if self.sink < 0 or self.recent < 0:
            raise ValueError(f"sink and recent must be >= 0, got sink={self.sink}, recent={self.recent}")
        if self.reduction not in ("mean", "max"):
            raise ValueError(f"reduction must be mean or max, got {self.reduction}")

    def kv_scores(self) -> np.ndarray:
        return profile_scores(self)

    def streaming_prefix(self, budget: int) -> int:
        """Prefix tokens a streaming head keeps (the window comes on top): sink + recent, cut to the budget when the
        share of full heads follows the budget."""
        keep = self.sink + max(self.recent - self.window, 0)
        return keep if self.full is not None else min(keep, prefix_budget(budget, self.window))

    def allocate(self, budget, caps, compressible):
        caps = np.broadcast_to(np.asarray(caps, dtype=np.int64), compressible.shape)
        heads = int(compressible.sum())
        stream = np.minimum(self.streaming_prefix(budget), caps)
        if self.full is not None:
            n_full = min(heads, max(1, round(self.full * heads)))
        else:  # the budget pays for: n_full x whole prompt + the rest x streaming
            whole = int(caps[compressible].max()) if heads else 0
            s = int(stream[compressible].max()) if heads else 0
            n_full = 0 if whole <= s else math.floor(heads * (prefix_budget(budget, self.window) - s) / (whole - s))
            n_full = min(heads, max(0, n_full))
        scores = np.where(compressible, np.asarray(self.kv_scores(), dtype=float), -np.inf)
        order = np.argsort(-scores.ravel(), kind="stable")[:n_full]
        is_full = np.zeros(compressible.size, dtype=bool)
        is_full[order] = True
        out = np.where(is_full.reshape(compressible.shape), caps, stream)
        return np.where(compressible, out, 0).astype(np.int64)

    def choose(self, plan, layer, probs):
        """A full head keeps every position it may; a streaming head the sink and the most recent."""
        lo = plan.first_candidate(layer)
        span = plan.prefix - lo
        return [(torch.arange(span) if b >= span else streaming_positions(span, int(b), self.sink)).to(probs.device)
                + lo for b in plan.budgets[layer]]
