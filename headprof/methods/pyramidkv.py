"""PyramidKV (Cai et al. 2024): per-layer budgets falling linearly with depth, the same total."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headprof.methods.allocate import capacity, prefix_budget, share
from headprof.methods.base import Method, register

RATIO = 20.0


def pyramid(budget: int, window: int, prefix: int | np.ndarray, compressible: np.ndarray,
            ratio: float = RATIO) -> np.ndarray:
    """Per-layer budgets from 2b - b/ratio at the bottom to b/ratio at the top; the heads of a layer share its
    budget as evenly as whole tokens allow (they may differ by one, and then the layer is stored masked)."""
    b = prefix_budget(budget, window)
    layers = np.flatnonzero(compressible.any(axis=1))
    out = np.zeros(compressible.shape, dtype=np.int64)
    if layers.size == 0:
        return out
    low = b / ratio
    high = 2 * b - low
    shape = np.linspace(high, low, layers.size) if layers.size > 1 else np.array([b], dtype=float)
    heads_per_layer = compressible[layers].sum(axis=1)
    caps = np.where(compressible, capacity(prefix, compressible), 0)
    per_layer = share(shape * heads_per_layer, int(b * heads_per_layer.sum()), caps[layers].sum(axis=1))
    for layer, total in zip(layers, per_layer, strict=True):
        mask = compressible[layer]
        out[layer, mask] = share(np.ones(int(mask.sum())), int(total), caps[layer, mask])
    return out


@register
@dataclass
class PyramidKV(Method):
    name = "pyramidkv"
    rank = 30
    summary = f"per layer, falling linearly with depth from 2b - b/{RATIO:g} to b/{RATIO:g}; same total"
    hard = {"ratio": 1.5}

    ratio: float = RATIO  # the top layer keeps b/ratio, the bottom one 2b - b/ratio

    def __post_init__(self) -> None:
        if self.ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {self.ratio}")

    def allocate(self, budget, caps, compressible):
        return pyramid(budget, self.window, caps, compressible, self.ratio)
