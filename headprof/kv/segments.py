"""Where each KV head's segment lies in a per-head layer's buffer, and how attention views them.

A per-head layer (`heads.py`) keeps one buffer with a contiguous segment per KV head. Attention reads the
segments through strided views, (heads, W, dim): window i starts at i * S. The segments are ordered, and S chosen,
so that every segment lies inside its own window (`windows`). Where that padding would cost more than another call
(hundreds of segments of very different sizes), the segments are split into a few *buckets* of similar sizes, laid
one after the other, each read through its own strided view (`Bucket`, `buckets_of`). This module is the geometry
alone: host arrays and small dataclasses, no tensors of keys.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Bucket:
    """Windows lo..hi-1 of the window order, read through one strided view: window i starts at
    base + (i - lo) * stride and is `width` entries wide."""

    lo: int
    hi: int
    base: int
    stride: int
    width: int

    def grown(self, by: int) -> Bucket:
        """After every segment grew by `by`: the lo segments before this bucket moved its base by lo * by."""
        return Bucket(self.lo, self.hi, self.base + self.lo * by, self.stride + by, self.width + by)


@dataclass(frozen=True)
class Windows:
    """Where each head's segment lies: segment of head order[i] starts at start[i], inside window i of the bucket
    that holds it (`Bucket`). Buckets hold segments of similar sizes, one after the other in the buffer."""

    order: list[int]
    start: list[int]
    buckets: tuple[Bucket, ...]

    def grown(self, by: int) -> Windows:
        """The windows after every segment grew by `by` entries: same order, each start shifted by the growth
        of the segments before it; entries before a window's segment stay as many (the mask still fits)."""
        return Windows(self.order, [a + i * by for i, a in enumerate(self.start)],
                       tuple(b.grown(by) for b in self.buckets))

    def window_starts(self) -> np.ndarray:
        """(heads,) where each window starts in the buffer."""
        return np.concatenate([b.base + np.arange(b.hi - b.lo) * b.stride for b in self.buckets])


# One strided view reads about (heads x its widest segment) columns. Splitting a layer's segments into buckets of
# similar sizes, one view and one attention call each, reads fewer, at the price of a call per bucket: a split is
# made where it saves at least SPLIT_SCALARS key numbers read (columns x key dim) per extra call. CPU: measured
# (benchmarks/bench_throughput.py: a fused SDPA call costs about as much as reading 2^17 key numbers). CUDA: an
# estimate from an H200 (a bucket's few launches, tens of microseconds, against reading keys, values and mask at a
# few TB/s), made after one view per layer decoded HeadKV 15x slower than SnapKV at batch 512 there
# (docs/results/gpu.md); at batch 1 no layer saves that much, so small batches keep one view. Other devices: one view.
SPLIT_SCALARS = {"cpu": 1 << 17, "cuda": 1 << 24}
MAX_BUCKETS = 6


def buckets_of(sizes: list[int], split: int | None) -> list[list[list[int]]]:
    """Candidate groupings of the heads of `sizes` into 1..MAX_BUCKETS buckets of contiguous sizes, each the one
    that reads the fewest columns for its number of buckets by an estimate (`windows` lays them out and keeps the
    cheapest for real). One group, in head order, when `split` is None or the sizes are equal: a layer of equal
    heads stays a plain dense view."""
    heads = len(sizes)
    if split is None or len(set(sizes)) == 1:
        return [[list(range(heads))]]
    by_size = sorted(range(heads), key=lambda h: sizes[h])
    values, counts = np.unique(np.asarray(sizes)[by_size], return_counts=True)
    before = np.concatenate([[0], np.cumsum(counts)])  # heads below each distinct size
    entries = np.concatenate([[0], np.cumsum(counts * values)])  # their entries
    n = len(values)
    # cols[i, j]: what a bucket of distinct sizes i..j-1 reads: its heads x its window, at least its largest size
    # and at least what a whole-entry stride leaves to the last window (total - (heads - 1) x floor(mean))
    count = before[None, :] - before[:, None]
    total = entries[None, :] - entries[:, None]
    width = np.maximum(np.concatenate([[0], values])[None, :], total - (count - 1) * (total // np.maximum(count, 1)))
    cols = np.where(count > 0, count * width, np.inf)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    out = []
    cuts: list[np.ndarray] = []
    for k in range(1, min(MAX_BUCKETS, n) + 1):
        options = best[:, None] + cols
        cuts.append(options.argmin(0))
        best = options.min(0)
        bounds = [n]
        for step in range(k - 1, -1, -1):
            bounds.append(int(cuts[step][bounds[-1]]))
        bounds = bounds[::-1]
        out.append([by_size[before[a]:before[b]] for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    return out


def windows(sizes: list[int], split: int | None = None) -> Windows:
    """Group segments of `sizes` entries into buckets (`buckets_of`: the grouping whose views read the fewest
    columns, plus `split` columns for each bucket after the first), and order each bucket's segments so that one
    strided view covers each in its own window, with the window as narrow as we can find (never narrower than the
    bucket's largest segment)."""
    views: dict[tuple[int, ...], tuple[list[int], list[int], int, int]] = {}
    best: tuple[float, Windows] | None = None
    for groups in buckets_of(sizes, split):
        order: list[int] = []
        start: list[int] = []
        buckets = []
        base = 0
        for heads in groups:
            sub = [sizes[h] for h in heads]
            key = tuple(heads)
            if key not in views:
                views[key] = _one_view(sub)
            local, offsets, stride, width = views[key]
            lo = len(order)
            order += [heads[j] for j in local]
            start += [base + a for a in offsets]
            buckets.append(Bucket(lo, len(order), base, stride, width))
            base += sum(sub)
        cost = sum((b.hi - b.lo) * b.width for b in buckets) + (split or 0) * (len(buckets) - 1)
        if best is None or cost < best[0]:
            best = (cost, Windows(order, start, tuple(buckets)))
    return best[1]


def _one_view(sizes: list[int]) -> tuple[list[int], list[int], int, int]:
    """(order, starts, stride, width) of one strided view over segments of `sizes`, laid back to back.

    With windows every `stride` entries and the last one ending where the buffer ends, segment i fits iff
    the entries before it stay within [i * stride, i * stride + D], D = total - heads * stride. A greedy
    order (the largest segment that keeps that bound) finds it when it exists; a binary search picks the
    widest stride that works. Stride = the smallest segment always works.
    """
    heads, total = len(sizes), sum(sizes)

    by_size = sorted(range(heads), key=lambda h: sizes[h])

    def order_for(stride: int) -> list[int] | None:
        slack = total - heads * stride
        left, ahead, order = list(by_size), 0, []
        left_sizes = [sizes[h] for h in left]
        while left:
            # the largest size that fits, the first head of that size
            fit = bisect.bisect_right(left_sizes, slack + stride - ahead) - 1
            if fit < 0:
                return None
            i = bisect.bisect_left(left_sizes, left_sizes[fit])
            h = left.pop(i)
            left_sizes.pop(i)
            ahead += sizes[h] - stride
            if ahead < 0:
                return None
            order.append(h)
        return order

    lo, hi = min(sizes), total // heads
    best = (lo, order_for(lo))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        found = order_for(mid)
        if found is None:
            hi = mid - 1
        else:
            lo, best = mid, (mid, found)
    stride, order = best
    start = [0]
    for h in order[:-1]:
        start.append(start[-1] + sizes[h])
    return order, start, stride, total - (heads - 1) * stride


@dataclass(frozen=True)
class Segments:
    """The per-head layout of a compressed layer, fixed when it is compressed: how many prompt tokens each KV
    head kept, which window of the strided view holds its segment, and where in that window it lies. Growing
    the room shifts the windows (`Windows.grown`) but none of these offsets. Host arrays: the layout is decided
    on the host."""

    kept: np.ndarray  # (heads,) prompt tokens kept, per KV head
    order: np.ndarray  # (heads,) window i holds the segment of KV head order[i]
    unorder: np.ndarray  # (heads,) the window of KV head h (the inverse of `order`)
    kept_w: np.ndarray  # (heads,) per window: its head's kept tokens
    first_w: np.ndarray  # (heads,) per window: where its segment starts, relative to the window
    kept_end_w: np.ndarray  # (heads,) per window: one past its kept tokens, relative to the window
    uniform: bool  # every head keeps the same count: the view is a dense cache, with no mask
    in_order: bool  # window i holds head i (no reordering around attention)
    reach: int  # the furthest column a window reads before generated tokens (the end of its kept tokens)
    bucket_reach: tuple[int, ...]  # the same, per bucket: its view's width before generated tokens

    @classmethod
    def of(cls, kept: list[int], win: Windows) -> Segments:
        order = np.asarray(win.order)
        kept_w = np.asarray(kept)[order]
        first_w = np.asarray(win.start) - win.window_starts()
        kept_end_w = first_w + kept_w
        return cls(np.asarray(kept), order, np.argsort(order), kept_w, first_w, kept_end_w,
                   uniform=len(set(kept)) == 1, in_order=win.order == list(range(len(kept))),
                   reach=int(kept_end_w.max()),
                   bucket_reach=tuple(int(kept_end_w[b.lo:b.hi].max()) for b in win.buckets))

    @property
    def heads(self) -> int:
        return len(self.kept)


@dataclass(frozen=True)
class Steps:
    """What the decode steps of one laid-out room write, made once with the room: per free step (from the
    `first` generated token on), the slot of each head and, for a masked layer, the mask column each window
    opens. A step then picks its entry by list index and computes no indices."""

    first: int
    slots: list[torch.Tensor]  # per step: (heads,) slot of each head's new entry in the buffer
    cols: list[torch.Tensor | None]  # per step: (heads, 1) column each window opens; None for a dense layer

    def at(self, generated: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.slots[generated - self.first], self.cols[generated - self.first]

