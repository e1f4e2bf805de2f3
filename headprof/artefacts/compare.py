"""Comparing profiles and judging their noise: rank correlation, overlaps, bootstrap, split halves.

A difference between two profiles only matters if it is larger than each profile's own noise. The
noise comes from the per-probe scores a profile stores: split the probes in two halves, correlate the
halves, and correct to full size with Spearman-Brown. Two profiles whose correlation reaches the lower
of their self-agreements are indistinguishable from a rerun.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from headprof.artefacts.profile import Profile, provenance_diff
from headprof.errors import ProfileError


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    x = np.asarray(x, dtype=float).ravel()
    order = np.argsort(x, kind="stable")
    r = np.empty(x.size)
    r[order] = np.arange(1, x.size + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=r)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 1.0 if np.array_equal(np.ravel(a), np.ravel(b)) else 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def kendall(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall tau-b (pairs tied in either ranking are handled as in scipy)."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(a.size, 1)
    da, db = da[iu], db[iu]
    n0 = da.size
    denom = np.sqrt((n0 - (da == 0).sum()) * (n0 - (db == 0).sum()))
    return float((da * db).sum() / denom) if denom else 1.0


def top_set(scores: np.ndarray, fraction: float) -> set[int]:
    flat = np.asarray(scores, dtype=float).ravel()
    k = max(1, int(round(fraction * flat.size)))
    return set(np.argsort(-flat, kind="stable")[:k].tolist())


def overlap(a: np.ndarray, b: np.ndarray, fraction: float) -> float:
    """Share of A's top `fraction` heads that are also in B's."""
    sa, sb = top_set(a, fraction), top_set(b, fraction)
    return len(sa & sb) / len(sa)


def jaccard(a: np.ndarray, b: np.ndarray, fraction: float) -> float:
    sa, sb = top_set(a, fraction), top_set(b, fraction)
    return len(sa & sb) / len(sa | sb)


def split_half(per_probe: np.ndarray, seed: int = 0, draws: int = 20) -> float | None:
    """Spearman between the means of two disjoint random halves of the probes (averaged over draws)."""
    n = per_probe.shape[0]
    if n < 4:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        order = rng.permutation(n)
        values.append(spearman(per_probe[order[: n // 2]].mean(0), per_probe[order[n // 2:]].mean(0)))
    return float(np.mean(values))


def full_size(r: float | None) -> float | None:
    """Spearman-Brown: the agreement two full-size reruns would have, from the split-half value."""
    return None if r is None else 2 * r / (1 + r) if r > -1 else -1.0


def bootstrap_ci(per_probe: np.ndarray, draws: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile intervals of the mean over axis 0 (each head's mean score over probes, or the mean
    of per-item values), resampling rows."""
    rng = np.random.default_rng(seed)
    n = per_probe.shape[0]
    means = np.stack([per_probe[rng.integers(0, n, n)].mean(0) for _ in range(draws)])
    return np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)


def mass_in_top(scores: np.ndarray, fraction: float = 0.1) -> float:
    flat = np.clip(np.asarray(scores, dtype=float).ravel(), 0, None)
    if flat.sum() == 0:
        return 0.0
    return float(flat[list(top_set(flat, fraction))].sum() / flat.sum())


def head_name(index: int, heads: int) -> str:
    return f"L{index // heads}H{index % heads}"


@dataclass
class Comparison:
    level: str
    spearman: float
    kendall: float
    top10_overlap: float
    keep: float
    kept_jaccard: float
    moved: list[dict]
    noise_a: float | None
    noise_b: float | None
    within_noise: bool | None
    provenance: list[str]  # provenance fields that differ ('field: A vs B'): what may explain a change

    def to_dict(self) -> dict:
        return asdict(self)


def scores_at(profile: Profile, level: str) -> np.ndarray:
    if level == "query":
        if not profile.has_query_scores:
            raise ProfileError("this profile has KV-head scores only; compare with --kv")
        return profile.query_scores()
    return profile.kv_scores("mean")


def compare(a: Profile, b: Profile, level: str = "query", keep: float = 0.5, force: bool = False,
            top_moved: int = 10) -> Comparison:
    """Compare B against A. Refuses different shapes, methods or levels unless `force`."""
    sa, sb = scores_at(a, level), scores_at(b, level)
    if sa.shape != sb.shape:
        raise ProfileError(f"profiles have different shapes ({sa.shape[0]}x{sa.shape[1]} vs "
                           f"{sb.shape[0]}x{sb.shape[1]}); they are not the same model")
    differs = provenance_diff(a, b)
    if a.method != b.method and not force:
        raise ProfileError(f"profiles use different methods ({a.method} vs {b.method})"
                           + (f"; provenance differs: {', '.join(differs)}" if differs else "")
                           + "; pass --force to compare anyway")
    if not 0 < keep <= 1:
        raise ProfileError(f"--keep must be in (0, 1], got {keep}")
    heads = sa.shape[1]
    where = np.flatnonzero(a.present(level) & b.present(level))  # the heads both models have, in grid order
    sa, sb = sa.ravel()[where], sb.ravel()[where]
    ra, rb = ranks(-sa), ranks(-sb)  # rank 1 = most important
    moved = np.argsort(-np.abs(ra - rb), kind="stable")[:top_moved]
    moved_rows = [{"head": head_name(int(where[i]), heads), "rank_a": int(ra[i]), "rank_b": int(rb[i]),
                   "score_a": float(sa[i]), "score_b": float(sb[i])} for i in moved]
    rho = spearman(sa, sb)
    na, nb = (full_size(split_half(p.per_probe()[:, p.present()])) if level == "query" and p.probes else None
              for p in (a, b))
    floors = [x for x in (na, nb) if x is not None]
    within = (rho >= min(floors)) if floors else None
    return Comparison(level=level, spearman=rho, kendall=kendall(sa, sb), top10_overlap=overlap(sa, sb, 0.1),
                      keep=keep, kept_jaccard=jaccard(sa, sb, keep), moved=moved_rows, noise_a=na, noise_b=nb,
                      within_noise=within, provenance=differs)


# `headprof check` defaults, calibrated on SmolLM2-135M (docs/ci.md): a same-seed rescore on CPU gives
# Spearman 1.0 and overlap 1.0; zeroing the model's three most important heads gives far less.
MIN_SPEARMAN = 0.9
MIN_OVERLAP = 0.7


def subset_scores(profile: Profile, ids: list[str]) -> np.ndarray:
    """Mean per-probe query scores of the given probes, counting them the way the profile did."""
    rows = {r["id"]: r for r in profile.probes}
    chosen = [rows[i] for i in ids if i in rows]
    counted = [r for r in chosen if r.get("counted", True)] or chosen
    return np.mean([np.asarray(r["scores"], dtype=float) for r in counted], axis=0)


@dataclass
class Summary:
    """What `headprof show` prints: the top heads with bootstrap intervals, split-half stability, mass."""

    top: list[dict]  # rank, head, score, low, high (None without per-probe scores)
    split_half: float | None
    split_half_full_size: float | None
    mass_top10: float
    layers_without_heads: list[int] = field(default_factory=list)


def summarise(profile: Profile, top: int = 10) -> Summary:
    has_query = profile.has_query_scores
    grid = profile.query_scores() if has_query else profile.kv_scores("mean")
    heads = grid.shape[1]
    present = profile.present("query" if has_query else "kv")
    where = np.flatnonzero(present)  # the model's heads, in grid order
    scores = grid.ravel()[where]
    per_probe = profile.per_probe()[:, present] if has_query and profile.probes else None
    lo = hi = None
    if per_probe is not None and per_probe.shape[0] >= 2:
        lo, hi = bootstrap_ci(per_probe)
    rows = [{"rank": rank, "head": head_name(int(where[i]), heads), "score": float(scores[i]),
             "low": float(lo[i]) if lo is not None else None,
             "high": float(hi[i]) if hi is not None else None}
            for rank, i in enumerate(np.argsort(-scores, kind="stable")[:top], 1)]
    sh = split_half(per_probe) if per_probe is not None else None
    return Summary(rows, sh, full_size(sh), mass_in_top(scores), profile.layers_without_heads)
