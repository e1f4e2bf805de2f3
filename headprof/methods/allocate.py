"""The arithmetic shared by every method's allocation (the methods themselves are in `headprof/methods`).

Allocations are an integer array [layer, kv_head] of *prefix* tokens to keep (the observation
window is kept on top). `budget` is tokens per KV head including the window, as in the paper and kvpress.
Only heads marked in `compressible` take part (sliding-window layers keep their window unless they are
compressed inside it; see docs/run.md); `caps` bound how many prefix positions each head can choose from.
Budgets never exceed the prefix: a head that would get more passes the surplus on to the others.
"""

from __future__ import annotations

import numpy as np

from headprof.errors import HeadprofError


class BudgetError(HeadprofError):
    """A budget that cannot be applied."""


def prefix_budget(budget: int, window: int) -> int:
    if budget <= window:
        raise BudgetError(f"budget {budget} must exceed the observation window ({window})")
    return budget - window


def share(weights: np.ndarray, total: int, cap: int | np.ndarray) -> np.ndarray:
    """Integers proportional to `weights`, each <= its cap, summing to min(total, sum of caps) exactly.

    Heads that hit their cap hand their surplus to the others, in proportion to their weights.
    """
    w = np.clip(np.asarray(weights, dtype=float).ravel(), 0, None)
    n = w.size
    cap = np.broadcast_to(np.asarray(cap, dtype=np.int64).ravel() if np.ndim(cap) else np.int64(cap), (n,))
    total = min(int(total), int(cap.sum()))
    if n == 0 or total <= 0:
        return np.zeros(n, dtype=np.int64)
    if w.sum() <= 0:
        w = np.ones(n)
    alloc = np.zeros(n)
    free = np.ones(n, dtype=bool)
    remaining = float(total)
    while remaining > 1e-9 and free.any():
        ww = np.where(free, w, 0.0)
        if ww.sum() <= 0:
            ww = free.astype(float)
        alloc += remaining * ww / ww.sum()
        over = alloc > cap
        remaining = float((alloc[over] - cap[over]).sum())
        alloc[over] = cap[over]
        free &= alloc < cap
    out = np.floor(alloc + 1e-9).astype(np.int64)
    short = total - int(out.sum())
    order = np.argsort(-(alloc - out), kind="stable")
    for i in order:
        if short <= 0:
            break
        if out[i] < cap[i]:
            out[i] += 1
            short -= 1
    return out


def capacity(prefix: int | np.ndarray, compressible: np.ndarray) -> np.ndarray:
    """Per-head caps [layer, kv_head]: `prefix` is one count for every head or an array of that shape."""
    return np.broadcast_to(np.asarray(prefix, dtype=np.int64), compressible.shape)


def uniform(budget: int, window: int, prefix: int | np.ndarray, compressible: np.ndarray) -> np.ndarray:
    """SnapKV and StreamingLLM: the same budget for every head."""
    b = np.minimum(prefix_budget(budget, window), capacity(prefix, compressible))
    return np.where(compressible, b, 0).astype(np.int64)
