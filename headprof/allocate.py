"""How many prompt tokens each KV head keeps: HeadKV (Eq. 4) and the baselines, one function each.

All functions return an integer array [layer, kv_head] of *prefix* tokens to keep (the observation
window is kept on top). `budget` is tokens per KV head including the window, as in the paper and kvpress.
Only heads marked in `compressible` take part: sliding-window layers already hold at most their window
and keep exactly that (see docs/run.md), so the budget is shared among full-attention layers.
Budgets never exceed the prefix: a head that would get more passes the surplus on to the others.
"""

from __future__ import annotations

import numpy as np

from headprof.errors import HeadprofError

METHODS = ("full", "streaming", "snapkv", "pyramidkv", "adakv", "headkv")


class BudgetError(HeadprofError):
    """A budget that cannot be applied."""


def _prefix_budget(budget: int, window: int) -> int:
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


def headkv(scores: np.ndarray, budget: int, window: int, prefix: int | np.ndarray, compressible: np.ndarray,
           beta: float = 1.2) -> np.ndarray:
    """HeadKV Eq. 4: every head keeps b - b/beta; a pool of (b/beta) x heads is split by importance."""
    if beta < 1:
        raise BudgetError(f"beta must be >= 1, got {beta}")
    b = _prefix_budget(budget, window)
    heads = int(compressible.sum())
    s = np.clip(np.asarray(scores, dtype=float)[compressible], 0, None)
    p = s / s.sum() if s.sum() > 0 else np.full(heads, 1.0 / max(heads, 1))
    floor = b - b / beta
    weights = floor + p * (b / beta) * heads  # real-valued budgets; `share` rounds them exactly
    out = np.zeros(compressible.shape, dtype=np.int64)
    out[compressible] = share(weights, b * heads, capacity(prefix, compressible)[compressible])
    return out


def uniform(budget: int, window: int, prefix: int | np.ndarray, compressible: np.ndarray) -> np.ndarray:
    """SnapKV and StreamingLLM: the same budget for every head."""
    b = np.minimum(_prefix_budget(budget, window), capacity(prefix, compressible))
    return np.where(compressible, b, 0).astype(np.int64)


def pyramid(budget: int, window: int, prefix: int | np.ndarray, compressible: np.ndarray,
            ratio: float = 20.0) -> np.ndarray:
    """PyramidKV: per-layer budgets falling linearly with depth (top = bottom / ratio), same total."""
    b = _prefix_budget(budget, window)
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


def adakv_layer(pooled: np.ndarray, budget: int, window: int, prefix: int, safeguard: float = 0.2) -> np.ndarray:
    """Ada-SnapKV: each head keeps a safeguard share of b; the rest of the layer's pool (b x heads) goes
    to the layer's highest-scoring (head, position) pairs."""
    b = _prefix_budget(budget, window)
    heads, n = pooled.shape
    floor = min(int(safeguard * b), prefix)
    pool = min(b * heads, heads * prefix) - floor * heads
    ranked = np.sort(np.asarray(pooled, dtype=float), axis=1)[:, ::-1][:, floor:]  # what is left per head
    flat = ranked.ravel()
    top = np.argpartition(-flat, pool - 1)[:pool] if 0 < pool < flat.size else np.arange(flat.size if pool else 0)
    return floor + np.bincount(top // max(n - floor, 1), minlength=heads).astype(np.int64)
