"""A KV cache that holds a different number of prompt tokens in every KV head.

A compressed layer keeps one buffer whose entries hold a key and its value side by side. Each KV head
owns a contiguous *segment* of it: the prompt tokens it kept, then the tokens generated since, then a
little free room. The room grows in small steps, sized so that what the layers hold beyond their tokens
(free slots, masks) stays within `SLACK` of the tokens' bytes: an early stop leaves little unused, and
nothing but kept and generated tokens is ever stored. Growing moves each segment whole, with one indexed
read of the old buffer: the windows keep their order and only shift. In a `HeadKVCache` every compressed
layer grows at the same token, in one burst before the forward pass reaches the first layer: the
bookkeeping runs back to back, warm, rather than interrupting the forward pass at every token.

Attention reads the segments through a strided view, (heads, W, dim): window i starts at i * S. The
segments are ordered, and S chosen, so that every segment lies inside its own window (`windows`). A
window may also cover its neighbours' entries; a mask hides them. The mask (one byte per window and
column, counted in the bytes held) is built when the buffer is laid out and kept current by `update`,
which opens one slot per window and new token. What a decode step needs (its slots, the mask columns it
opens, the views over the room) is made, on the host, with the room: a step is a few tensor operations
whatever the number of heads, and on a GPU it computes no indices. When all heads keep the same count
(SnapKV, StreamingLLM), S = W = the segment size and the view is a plain dense cache, with no mask. When
they differ (HeadKV, AdaKV, and PyramidKV on layers whose budget does not divide evenly among their heads,
which then differ by one token), W is close to the largest segment: one batched call does about the work of a
cache padded to the longest head, without storing the padding. Where that padding would cost more than another
call (a batch of skewed layers: hundreds of segments of very different sizes), the segments are split into a few
*buckets* of similar sizes, laid one after the other, each read through its own strided view (`Bucket`,
`buckets_of`): a few calls per layer, whatever the number of heads or sequences.

Positions keep counting from the prompt length, so RoPE continues where the prompt ended. A layer may
also carry a sliding window (Gemma-style layers compressed inside their window): keys older than the
window are masked by position and dropped when the layer grows.

Uncompressed layers (the full cache, sliding-window layers left as the model keeps them, a hybrid model's Mamba or
linear-attention state, KV-shared layers) are the layers transformers itself makes for the model (`native.py`); a
hybrid layer (attention beside a linear state) compresses its keys and keeps its state as transformers does
(`HybridHeadKVLayer`); an MLA layer keeps one selection of its latent (`latent.py`). The cache mixes these kinds.
"""

from __future__ import annotations

import bisect
import contextvars
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import (
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
)

from headprof import native
from headprof.latent import IndexedLatentLayer, LatentLayer
from headprof.layout import LOCAL_KIND

# The layer whose cache was updated last: the layer an attention call belongs to when its module does not say
# (a block shared by several layers, as in Zamba, carries layer_idx -1 and hands the real one to the cache).
LAST_UPDATE: contextvars.ContextVar[int | None] = contextvars.ContextVar("headprof_last_update", default=None)


def layer_of(module) -> int | None:
    """The layer index an attention call belongs to: its module's, or the last cache update's."""
    idx = getattr(module, "layer_idx", None)
    return idx if isinstance(idx, int) and idx >= 0 else LAST_UPDATE.get()


SLACK = 0.045  # right after growing, compressed layers hold at most this share more bytes than their tokens


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
# (docs/results.md); at batch 1 no layer saves that much, so small batches keep one view. Other devices: one view.
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


class HeadKVLayer(DynamicLayer):
    """Dense during prefill; after `compress`, one buffer of keys and values with a segment per head.

    The state, by concern: the per-head layout (`seg`, fixed at compress); the buffer and what it holds
    (`kv`, `positions`, `generated`, `dropped`, `room`, `next_free`); the growth policy (`_grow`, `_shift`,
    `_place`: when the room runs out, every segment grows alike); the per-step update (`update`, with the
    `steps` made by `_ready`); and the views attention reads (`view`, `view_positions`, `window_bounds`).
    """

    def __init__(self, sliding_window: int | None = None, slack: float = SLACK) -> None:
        super().__init__()
        self.sliding_window = sliding_window
        self.slack = slack
        self.seen = 0  # positions so far (prompt + appended; a batch's padded length)
        self.prompt_len = 0
        self.batch = 1  # sequences; the layer holds batch x KV heads segments
        self.kept_prompt: list[int] = []  # prompt tokens each segment kept (what its budget bought)
        self.key_dim = 0  # keys take the first key_dim columns of `kv`, values the rest
        self.seg: Segments | None = None
        # (entries, key dim + value dim): an entry's key then its value, segments as in the module docstring;
        # `k` and `v` are views of it. One buffer: a step writes both with one copy, a growth moves both at once
        self.kv: torch.Tensor | None = None
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # (entries,) int32 position of every slot (sliding only)
        self.room = 0  # slots per head for generated tokens
        self.generated = 0  # generated tokens held per head
        self.dropped = 0  # generated tokens a sliding window has passed and a growth dropped, per head
        self.next_free = np.zeros(0, dtype=np.int64)  # (heads,) each head's first free slot when the room was laid out
        self.win: Windows | None = None
        self.returned: torch.Tensor | None = None
        self.backend: str | None = None  # the attention backend, chosen at the first call (attention.py)
        self.order = self.unorder = None  # device copies of `seg.order` and `seg.unorder`
        # device copies of `seg.first_w` and `seg.kept_end_w`, (heads, 1); scalars for the additive mask
        self._first_dev = self._kept_end_dev = self._zero = self._ninf = None
        # unequal heads: (1, heads, 1, reach + room) bool, what each window may read, kept up to date by
        # `update` (it opens one slot per window and new token); bool, so it adds 1 byte per column and head
        self._open: torch.Tensor | None = None
        self._open_rows: torch.Tensor | None = None
        self.steps: Steps | None = None
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None  # a masked layer's views over its room

    @property
    def compressed(self) -> bool:
        return self.k is not None

    @property
    def lens(self) -> list[int]:
        """Kept prompt tokens per KV head (empty before `compress`)."""
        return [] if self.seg is None else self.seg.kept.tolist()

    @property
    def heads(self) -> int:
        return 0 if self.seg is None else self.seg.heads

    @property
    def uniform(self) -> bool:
        return self.seg is None or self.seg.uniform

    @property
    def in_order(self) -> bool:
        return self.seg is None or self.seg.in_order

    @property
    def reach(self) -> int:
        return 0 if self.seg is None else self.seg.reach

    def update(self, key_states, value_states, *args, **kwargs):
        q = key_states.shape[-2]
        self.seen += q
        if not self.compressed:
            return super().update(key_states, value_states, *args, **kwargs)
        if self.generated + q > self.room:  # (a HeadKVCache grows all its layers at once before they get here)
            self._grow(q, free_slots([self], q))
        if q == 1:  # this step's slots, and the mask columns it opens: made ahead with the room (`_ready`)
            slots, opened = self.steps.at(self.generated)
        else:
            ahead = self.generated + np.arange(q)
            slots = _on((self.next_free[:, None] + ahead).ravel(), self.kv.device)
            opened = _on(self.seg.kept_end_w[:, None] + ahead, self.kv.device)  # (heads, q)
        entries = torch.cat((key_states, value_states), -1)  # (batch, heads, q, dim): segment-major rows
        self.kv.index_copy_(0, slots, entries.view(-1, entries.shape[-1]))
        if self.positions is not None:
            new_pos = self.seen - q + torch.arange(q, device=slots.device, dtype=torch.int32)
            self.positions.index_copy_(0, slots, new_pos.repeat(self.heads))
        if self._open is not None:
            self._open_rows.scatter_(1, opened, True)
        self.generated += q
        self.returned = key_states  # attention recognises this call's keys and reads the layer itself
        return key_states, value_states

    def compress(self, keep: list[torch.Tensor]) -> None:
        """Keep positions keep[s] (sorted) of segment s = b * kv_heads + h (sequence b's KV head h); free the
        dense tensors. A batch is one layer of batch x heads segments: each sequence keeps its own tokens, and
        one attention call covers them all (positions count in the batch's padded frame, as transformers'
        cache positions do)."""
        keys, values = self.keys, self.values  # (batch, heads, seq, dim)
        batch, kv_heads, seq = keys.shape[:3]
        rows = len(keep) // kv_heads  # one prompt's keys may feed several rows (eval's cells of one prefill)
        if len(keep) % kv_heads or (batch != rows and batch != 1):
            raise ValueError(f"{len(keep)} selections for {batch} sequences x {kv_heads} KV heads")
        device = keys.device
        lens = [int(k.numel()) for k in keep]
        source = torch.arange(len(keep), device=device)
        if batch == 1:
            source = source % kv_heads
        batch = self.batch = rows
        head_of = torch.repeat_interleave(source, torch.tensor(lens, device=device))
        pos = torch.cat([k.to(device) for k in keep])
        keys, values = keys.reshape(1, -1, seq, keys.shape[-1]), values.reshape(1, -1, seq, values.shape[-1])
        self.key_dim = keys.shape[-1]
        kept_pos = pos.to(torch.int32) if self.sliding_window is not None else None
        self._lay_out(lens, torch.cat((keys[0, head_of, pos], values[0, head_of, pos]), -1), kept_pos, seq)
        self.kept_prompt = lens
        # the dense tensors are freed; empty ones stay for model code that asks a layer whether it holds keys
        self.keys, self.values = keys.new_empty((batch, kv_heads, 0, keys.shape[-1])), values.new_empty(
            (batch, kv_heads, 0, values.shape[-1]))  # new storage: views would keep the prompt's tensors alive

    def _lay_out(self, lens: list[int], entries: torch.Tensor, positions: torch.Tensor | None,
                 prompt_len: int) -> None:
        """Lay the segments' `entries` (each segment's, one after the other) out as a fresh buffer with no room
        (the first new token grows it, with the other layers in a cache)."""
        device = entries.device
        self.prompt_len = prompt_len
        self.generated = self.dropped = 0
        split = SPLIT_SCALARS.get(device.type)
        win = windows(lens, None if split is None else max(1, split // self.key_dim))
        self.seg = seg = Segments.of(lens, win)
        self.order, self.unorder = _on(seg.order, device), _on(seg.unorder, device)
        self._first_dev, self._kept_end_dev = _on(seg.first_w[:, None], device), _on(seg.kept_end_w[:, None], device)
        self._zero = torch.zeros((), dtype=entries.dtype, device=device)
        self._ninf = torch.full((), float("-inf"), dtype=entries.dtype, device=device)
        self.room = 0
        self._place(entries, positions, np.concatenate([[0], np.cumsum(lens)[:-1]]), 0, win)

    def select_sequences(self, rows: list[int]) -> None:
        """Keep only the sequences `rows` of the batch (the others ended: they stop costing). Each kept segment's
        tokens, prompt and generated alike, become its held tokens in a fresh layout; positions go on counting."""
        h = self.heads // self.batch
        segments = [b * h + j for b in rows for j in range(h)]
        parts = [self.head_kv(s) for s in segments]
        entries = torch.cat([torch.cat((k, v), -1) for k, v, _ in parts])
        positions = torch.cat([p for _, _, p in parts]) if self.positions is not None else None
        self.kept_prompt = [self.kept_prompt[s] for s in segments]
        self.batch = len(rows)
        self.keys, self.values = self.keys[rows], self.values[rows]
        self._lay_out([k.shape[0] for k, _, _ in parts], entries, positions, self.seen)

    def _keep_from(self, q: int) -> int:
        """Generated entries a growth for `q` new tokens drops: those a sliding window has passed (never read again)."""
        return 0 if self.sliding_window is None else max(0, self.generated + q - self.sliding_window)

    def _grow(self, q: int, free: int) -> None:
        """Reallocate with room for `q` more tokens per head plus `free` slots. Every segment grows by the same
        amount, so the windows keep their order and only shift."""
        keep_from = self._keep_from(q)
        room = self.generated - keep_from + q + free
        if keep_from == 0:
            self._shift(room)
        else:
            self._place(self.kv, self.positions, self._segments(), room, self.win.grown(room - self.room),
                        keep_from)

    def _shift(self, room: int) -> None:
        """Grow every segment's room to `room`: segment i of the window order moves by i * (growth), as it is,
        so one indexed read of the old buffer makes the new one (new free slots read whatever follows: they
        are masked, and only need to be finite)."""
        by, heads, old = room - self.room, self.heads, self.kv.shape[0]
        size = self.seg.kept_w + room
        src = np.arange(old + heads * by) - np.repeat(np.arange(0, heads * by, by), size)
        src = _on(np.minimum(src, old - 1, out=src), self.kv.device)
        self._hold(self.kv.index_select(0, src))
        if self.positions is not None:
            self.positions = self.positions.index_select(0, src)
        if self._open is not None:  # each window's new columns come after everything it reads: closed
            self._set_open(F.pad(self._open, (0, by), value=False))
        self.next_free = self.next_free + self.seg.unorder * by  # head h's segment is window unorder[h]
        self.room, self.win = room, self.win.grown(by)
        self._ready()

    def _segments(self, win: Windows | None = None) -> np.ndarray:
        """(heads,) where each head's segment starts in the buffer laid out by `win` (default: the current)."""
        win = win or self.win
        seg = np.empty(self.heads, dtype=np.int64)
        seg[win.order] = win.start
        return seg

    def _place(self, kv, pos, starts: np.ndarray, room: int, win: Windows, keep_from: int = 0) -> None:
        """A new buffer laid out by `win` with `room` slots per head, gathered from the old flat `kv` (and
        `pos`) in one indexed read, in which head h's kept tokens start at starts[h], followed by its `t`
        generated ones, of which the first `keep_from` are dropped. Free slots repeat an entry of their head:
        they are never read unmasked, but must hold finite numbers (0 * NaN is NaN)."""
        order, lens = np.asarray(win.order), np.asarray(self.lens)
        kept, first, moved = lens[order], starts[order], self.generated - keep_from
        size = kept + room  # window order: segment i, of head order[i], holds its kept, generated, free slots
        offset = np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)
        kept_r = np.repeat(kept, size)
        src = np.repeat(first, size) + np.where(offset < kept_r, offset,
                                                np.where(offset < kept_r + moved, offset + keep_from, 0))
        src = _on(src, kv.device)
        self._hold(kv.index_select(0, src))
        if pos is not None:
            self.positions = pos.index_select(0, src)
        self.generated, self.dropped = moved, self.dropped + keep_from
        self.room, self.win = room, win
        self.next_free = self._segments(win) + lens  # each head's first free slot
        if not self.uniform:
            j = np.arange(self.reach + room)
            mine = (j >= self.seg.first_w[:, None]) & (j < self.seg.kept_end_w[:, None] + self.generated)
            self._set_open(_on(mine[None, :, None], kv.device))
        else:  # (a layout made uniform by sequences leaving drops its mask)
            self._open = self._open_rows = None
        self._ready()

    def _ready(self) -> None:
        """Make, for the room just laid out, what decode steps would otherwise compute at every step (`Steps`);
        and, for a masked layer, the views over its whole room (the mask hides what is not filled yet). They hold
        indices per head and free step, as `next_free` does per head, not tokens: `nbytes` does not count them."""
        ahead, device = np.arange(self.generated, self.room)[:, None], self.kv.device
        slots = list(_on(self.next_free + ahead, device).unbind(0))
        cols = [None] * len(slots) if self.uniform else list(
            _on(self.seg.kept_end_w[:, None] + ahead[:, None], device).unbind(0))
        self.steps = Steps(self.generated, slots, cols)
        self._views = None if self.uniform else [self._strided(b, w + self.room)
                                                 for b, w in zip(self.win.buckets, self.seg.bucket_reach, strict=True)]

    def _hold(self, kv: torch.Tensor) -> None:
        self.kv, self.k, self.v = kv, kv[:, :self.key_dim], kv[:, self.key_dim:]

    def _set_open(self, is_open: torch.Tensor) -> None:
        self._open, self._open_rows = is_open, is_open[0, :, 0]  # (1, heads, 1, width) and a (heads, width) view

    @property
    def buckets(self) -> tuple[Bucket, ...]:
        """The layer's views: windows lo..hi-1 of the window order each (one, unless its heads differ widely)."""
        return self.win.buckets

    def width(self, bucket: int = 0) -> int:
        """Columns of a bucket's view: a dense layer's filled ones; a masked layer's whole room (no window reads
        past it)."""
        return self.seg.bucket_reach[bucket] + (self.generated if self.uniform else self.room)

    def _strided(self, bucket: Bucket, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        row, heads = self.kv.shape[-1], bucket.hi - bucket.lo
        strides, at = (0, bucket.stride * row, row, 1), bucket.base * row
        return (self.k.as_strided((1, heads, width, self.k.shape[-1]), strides, self.k.storage_offset() + at),
                self.v.as_strided((1, heads, width, self.v.shape[-1]), strides, self.v.storage_offset() + at))

    def view(self, masked: bool = True) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Per bucket, keys and values for one attention call, (1, hi - lo, width, dim), window i for KV head
        `win.order[i]`, and an additive (1, hi - lo, 1, width) mask of what each window may read (None:
        everything, the dense case, or not `masked`: a backend that reads the windows' bounds instead)."""
        if self.uniform:
            return [(*self._strided(self.buckets[0], self.width()), None)]
        if not masked:
            return [(k, v, None) for k, v in self._views]
        if len(self.buckets) == 1:
            return [(*self._views[0], torch.where(self._open, self._zero, self._ninf))]
        return [(k, v, torch.where(self._open[:, b.lo:b.hi, :, :k.shape[2]], self._zero, self._ninf))
                for b, (k, v) in zip(self.buckets, self._views, strict=True)]

    def window_bounds(self, bucket: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(hi - lo,) int32 first and one-past-last entry each window of a bucket reads, relative to the window."""
        b = self.buckets[bucket]
        return (self._first_dev[b.lo:b.hi, 0].int(), (self._kept_end_dev[b.lo:b.hi, 0] + self.generated).int())

    def view_positions(self, bucket: int = 0) -> torch.Tensor:
        """Positions of the entries a bucket's `view` returns, (hi - lo, width). Kept prompt tokens of a layer
        without a window read as -1: they come before every query, which is all a causal mask needs."""
        b, width = self.buckets[bucket], self.width(bucket)
        if self.positions is not None:
            return self.positions.as_strided((b.hi - b.lo, width), (b.stride, 1),
                                             self.positions.storage_offset() + b.base)
        rel = torch.arange(width, device=self.k.device, dtype=torch.int32) - self._kept_end_dev[b.lo:b.hi]
        return torch.where(rel < 0, -1, self.prompt_len + self.dropped + rel)

    def head_kv(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions) of head h, kept then generated: the obvious per-head view (reference)."""
        i = self.win.order.index(h)
        a, n = self.win.start[i], self.lens[h] + self.generated
        if self.positions is not None:
            pos = self.positions[a:a + n]
        else:
            pos = torch.cat([torch.full((self.lens[h],), -1, dtype=torch.int32, device=self.k.device),
                             self.prompt_len + self.dropped + torch.arange(self.generated, device=self.k.device,
                                                                      dtype=torch.int32)])
        return self.k[a:a + n], self.v[a:a + n], pos

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def entries(self) -> int:
        """KV entries (tokens x KV heads) in use."""
        if self.compressed:
            return sum(self.lens) + self.heads * self.generated
        return _dense_entries(self)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer holds for its tokens."""
        held = [self.kv, self.positions, self._open] if self.compressed else [self.keys, self.values]
        return [t for t in held if t is not None]

    def nbytes(self) -> int:
        """Bytes of the tensors actually allocated for this layer."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def free_slots(layers: list[HeadKVLayer], q: int) -> int:
    """Free slots per head that `layers`, grown for `q` new tokens, can all have while what they hold beyond
    their tokens' own bytes (free slots, each masked window's columns, sliding layers' positions) stays within
    `slack` of those bytes: an early stop right after the growth is the worst case. None where a single slot would
    already break that (a tiny cache): the room then grows at every token."""
    spare = per_slot = 0.0
    for layer in layers:
        entry = layer.kv.shape[-1] * layer.kv.element_size()
        per_entry = 0 if layer.positions is None else layer.positions.element_size()
        mask = 0 if layer.uniform else layer.heads  # bool columns per window and slot
        generated = layer.generated - layer._keep_from(q) + q
        filled = sum(layer.lens) + layer.heads * generated
        spare += layer.slack * filled * entry - filled * per_entry - mask * (layer.reach + generated)
        per_slot += layer.heads * (entry + per_entry) + mask
    return max(0, math.floor(spare / per_slot))


def _on(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host-computed array (indices, a mask) on `device`: free on the CPU. On CUDA it goes through pinned
    memory, so the copy is queued without waiting for the kernels before it (one from pageable memory may)."""
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _dense_entries(layer) -> int:
    keys = getattr(layer, "keys", None)
    return 0 if keys is None or keys.numel() == 0 else keys.shape[1] * keys.shape[2]


class HybridHeadKVLayer(HeadKVLayer, LinearAttentionAndFullAttentionLayer):
    """A hybrid layer (attention beside a Mamba or linear-attention state in the same layer): its keys and values
    are compressed per head, its state stays exactly as transformers keeps it."""

    def __init__(self, sliding_window: int | None = None, slack: float = SLACK, number_of_states: int = 1) -> None:
        HeadKVLayer.__init__(self, sliding_window, slack)
        LinearAttentionAndFullAttentionLayer.__init__(self, number_of_states=number_of_states)

    def tensors(self) -> list[torch.Tensor]:
        return HeadKVLayer.tensors(self)


def _transformers_layer(kind: str, window: int | None):
    """The cache layer transformers makes for a layer of this kind (its table), with the layer's window."""
    try:
        from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING
    except ImportError:
        return DynamicSlidingWindowLayer(window) if window else DynamicLayer()
    cls = DYNAMIC_LAYER_TYPE_MAPPING.get(kind, DynamicLayer)
    return cls(sliding_window=window) if window else cls()


def _compressed_layer_for(kind: str, window: int | None, slack: float, latent: bool, native_layer) -> DynamicLayer:
    if latent:
        return IndexedLatentLayer() if kind == "indexed_attention" else LatentLayer()
    if kind in ("hybrid", "hybrid_sliding"):
        return HybridHeadKVLayer(window, slack, getattr(native_layer, "number_of_states", 1))
    return HeadKVLayer(window, slack)


class HeadKVCache(Cache):
    """One layer per model layer: `HeadKVLayer` where heads are compressed, transformers' own otherwise.

    `kinds[i]`: transformers' layer type (`models.layer_kinds`); `compress[i]`: whether the layer's heads are
    compressed (a full-attention layer, or a sliding one compressed inside its window `windows[i]`). Every
    other layer is `native[i]`, the layer transformers makes for the model (`native.model_layers`), or else the
    cache layer transformers makes for its kind, with its window. `latent`: layers whose cache is an MLA latent.
    """

    def __init__(self, kinds: list[str], compress: list[bool], windows: list[int | None],
                 slack: float = SLACK, native: list | None = None, latent: tuple[int, ...] = ()) -> None:
        native = native if native and len(native) == len(kinds) else [None] * len(kinds)
        layers = [_compressed_layer_for(kind, w, slack, i in latent, own) if squeeze
                  else own if own is not None else _transformers_layer(kind, w)
                  for i, (kind, squeeze, w, own) in enumerate(zip(kinds, compress, windows, native, strict=True))]
        super().__init__(layers=layers)
        self._last = len(layers)  # the last layer updated: a lower one starts a forward pass
        self._owners: dict[int, HeadKVLayer] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx <= self._last:  # a forward pass starts (its first layer with keys need not be layer 0)
            self._grow(key_states.shape[-2])
            self._owners = {}
        self._last = layer_idx
        LAST_UPDATE.set(layer_idx)
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        if isinstance(layer, HeadKVLayer) and layer.compressed:
            self._owners[id(out[0])] = layer  # layers that share this layer's KV attend with what it returned
        return out

    def _grow(self, q: int) -> None:
        """When the `q` new tokens overflow any compressed layer's room, lay out every compressed layer again,
        in one go, with the same free slots per head (`free_slots`): they then run out together again. A growth
        is one burst of work every few tokens, not one layer's bookkeeping interrupting the forward pass at
        every token, and the free room is sized on the whole cache's bytes."""
        layers = [layer for layer in self.layers if isinstance(layer, HeadKVLayer) and layer.compressed]
        if not any(layer.generated + q > layer.room for layer in layers):
            return
        free = free_slots(layers, q)
        for layer in layers:
            if layer.room != layer.generated + q + free or layer._keep_from(q):
                layer._grow(q, free)

    def latent_layer(self, layer_idx: int) -> LatentLayer | None:
        """The compressed MLA layer `layer_idx`, if it is one."""
        layer = self.layers[layer_idx] if layer_idx is not None and layer_idx < len(self.layers) else None
        return layer if isinstance(layer, LatentLayer) and layer.compressed else None

    def compressed_layer(self, layer_idx: int, key: torch.Tensor) -> HeadKVLayer | None:
        """The compressed layer whose `update` just returned `key`: layer `layer_idx`'s own, or, for a layer that
        reuses an earlier layer's KV (Gemma 3n), that layer (None for any other cache's keys)."""
        layer = self.layers[layer_idx] if layer_idx is not None and layer_idx < len(self.layers) else None
        if not (isinstance(layer, HeadKVLayer) and layer.compressed):
            layer = getattr(self, "_owners", {}).get(id(key))
        if layer is not None and layer.compressed and layer.returned is key:
            return layer
        return None

    def compress(self, layer: int, keep: list[torch.Tensor]) -> None:
        self.layers[layer].compress(keep)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch's sequences `indices` (the others ended) in every layer, whatever it holds."""
        rows = indices.tolist()
        for layer in self.layers:
            if isinstance(layer, HeadKVLayer) and layer.compressed:
                if native.has_state(layer):  # a hybrid layer's state (its keys are the segments)
                    native.select_rows_of_state(layer, indices)
                layer.select_sequences(rows)
            elif isinstance(layer, LatentLayer) and layer.compressed:
                raise ValueError("a compressed MLA latent holds one sequence")
            else:
                native.select_rows(layer, indices)

    def entries(self) -> int:
        return held_entries(self)

    def nbytes(self) -> int:
        return held_bytes(self)


# The cache's accounting, one owner for generation, eval, `run --json` and the benchmarks. "Held" is what the
# tensors of a cache occupy now (a compressed layer's keys, values, slot positions and masks); "full" is what the
# model's own cache holds for the same sequence; "ideal" is what a compressed cache would hold with no slack.

def layer_entries(layer) -> int:
    """KV entries (tokens x KV heads) a cache layer holds (batch 1)."""
    return layer.entries() if isinstance(layer, HeadKVLayer) else _dense_entries(layer)


def layer_bytes(layer) -> int:
    """Bytes of the tensors a cache layer holds for its tokens, of any cache (headprof's or transformers')."""
    if isinstance(layer, HeadKVLayer):
        return layer.nbytes()
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    return sum(t.numel() * t.element_size() for t in (keys, values) if isinstance(t, torch.Tensor))


def held_entries(cache: Cache) -> int:
    return sum(layer_entries(layer) for layer in cache.layers)


def held_bytes(cache: Cache) -> int:
    """Bytes the cache's tensors hold now (what `run` and `eval` report as KV bytes)."""
    return sum(layer_bytes(layer) for layer in cache.layers)


def full_layer_entries(kind: str, window: int | None, seq: int, kv_heads: int) -> int:
    """Entries the model's own cache layer of this kind holds after `seq` tokens (a sliding layer: its window)."""
    if kind in ("dummy", "linear_attention", "conv"):  # no KV of its own (shared, or a state that is not KV)
        return 0
    return (min(seq, window) if window and kind not in ("full_attention", "hybrid", LOCAL_KIND) else seq) * kv_heads


def _kv_heads(layout, layer: int) -> int:
    """KV entries per token a layer's cache holds: one latent for an MLA layer, else one per KV head."""
    return 1 if layer in getattr(layout, "latent", ()) else layout.kv_heads(layer)


def full_entries(layout, seq: int) -> int:
    """Entries of the uncompressed cache of a model (`models.HeadLayout`) after `seq` tokens."""
    windows = layout.layer_windows or [layout.sliding_window if k == "sliding_attention" else None
                                       for k in layout.attention_kinds]
    return sum(full_layer_entries(kind, w, seq, _kv_heads(layout, i))
               for i, (kind, w) in enumerate(zip(layout.attention_kinds, windows, strict=True)))


def ideal_entries(cache: Cache, layout, seq: int, appended: int) -> int:
    """What `cache` would hold with no free room: each compressed head its kept prompt tokens and the `appended`
    ones; every other layer what the model's own layer holds after `seq` tokens."""
    windows = layout.layer_windows or [layout.sliding_window if k == "sliding_attention" else None
                                       for k in layout.attention_kinds]
    total = 0
    for i, (layer, kind, w) in enumerate(zip(cache.layers, layout.attention_kinds, windows, strict=True)):
        if isinstance(layer, HeadKVLayer) and layer.compressed:
            total += sum(layer.lens) + layer.heads * appended
        elif isinstance(layer, LatentLayer) and layer.compressed:
            total += layer.kept + appended
        else:
            total += full_layer_entries(kind, w, seq, _kv_heads(layout, i))
    return total
