"""The per-head kind: a layer that holds a different number of prompt tokens in every KV head.

A compressed layer keeps one buffer whose entries hold a key and its value side by side. Each KV head
owns a contiguous *segment* of it: the prompt tokens it kept, then the tokens generated since, then a
little free room. The room grows in small steps, sized so that what the layers hold beyond their tokens
(free slots, masks) stays within `SLACK` of the tokens' bytes: an early stop leaves little unused, and
nothing but kept and generated tokens is ever stored. Growing moves each segment whole, with one indexed
read of the old buffer: the windows keep their order and only shift. In a `HeadKVCache` every compressed
layer grows at the same token, in one burst before the forward pass reaches the first layer: the
bookkeeping runs back to back, warm, rather than interrupting the forward pass at every token.

Attention reads the segments through strided views laid out by `segments.py`, a window per head, and a mask of
what each window may read (one byte per window and column, counted in the bytes held), built when the buffer is
laid out and kept current by `update`, which opens one slot per window and new token. What a decode step needs
(its slots, the mask columns it opens, the views over the room) is made, on the host, with the room: a step is a
few tensor operations whatever the number of heads, and on a GPU it computes no indices. When all heads keep the
same count (SnapKV, StreamingLLM), the view is a plain dense cache, with no mask. When they differ (HeadKV, AdaKV,
and PyramidKV on layers whose budget does not divide evenly among their heads), one batched call does about the
work of a cache padded to the longest head, without storing the padding. The readers of this layout (`readers/`)
are the attention backends.

Positions keep counting from the prompt length, so RoPE continues where the prompt ended. A layer may
also carry a sliding window (Gemma-style layers compressed inside their window): keys older than the
window are masked by position and dropped when the layer grows. A hybrid layer (attention beside a linear state)
compresses its keys and keeps its state as transformers does (`HybridHeadKVLayer`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer, LinearAttentionAndFullAttentionLayer

from headprof.kv import native, readers, segments
from headprof.kv.base import LayerKind
from headprof.kv.segments import Bucket, Segments, Steps, Windows, windows

SLACK = 0.045  # right after growing, compressed layers hold at most this share more bytes than their tokens


class HeadKVLayer(LayerKind, DynamicLayer):
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
        self.growths = 0  # how often the room was laid out again for new tokens (the benchmarks report it)
        self.next_free = np.zeros(0, dtype=np.int64)  # (heads,) each head's first free slot when the room was laid out
        self.win: Windows | None = None
        self.returned: torch.Tensor | None = None
        self.backend: str | None = None  # the attention backend that reads it, chosen at each layout (`readers`)
        self.value_dim = 0
        # per window: where its segment starts in the buffer (int64) and its kept tokens (int32), on the device, for
        # a backend that reads each segment by its bounds; with `generated` they give its length
        self.starts: torch.Tensor | None = None
        self.kept_dev: torch.Tensor | None = None
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
        n = keys.shape[0] * kv_heads  # (-1 would be ambiguous for values of no width: a layer whose keys are them)
        keys, values = keys.reshape(1, n, seq, keys.shape[-1]), values.reshape(1, n, seq, values.shape[-1])
        self.key_dim = keys.shape[-1]
        kept_pos = pos.to(torch.int32) if self.sliding_window is not None or self.keeps_positions else None
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
        split = segments.SPLIT_SCALARS.get(device.type)
        win = windows(lens, None if split is None else max(1, split // self.key_dim))
        self.seg = seg = Segments.of(lens, win)
        self.order, self.unorder = _on(seg.order, device), _on(seg.unorder, device)
        self._first_dev, self._kept_end_dev = _on(seg.first_w[:, None], device), _on(seg.kept_end_w[:, None], device)
        self._zero = torch.zeros((), dtype=entries.dtype, device=device)
        self._ninf = torch.full((), float("-inf"), dtype=entries.dtype, device=device)
        self.kept_dev = _on(seg.kept_w.astype(np.int32), device)
        self.value_dim = entries.shape[-1] - self.key_dim
        self.backend = readers.choose(self, entries)
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
        self.growths += 1
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
        if not self.uniform and readers.masked(self.backend):
            self._set_open(self._mask(kv.device))
        else:  # (a layout made uniform by sequences leaving drops its mask; a backend that reads bounds needs none)
            self._open = self._open_rows = None
        self._ready()

    def _ready(self) -> None:
        """Make, for the room just laid out, what decode steps would otherwise compute at every step (`Steps`);
        and, for a masked layer, the views over its whole room (the mask hides what is not filled yet). They hold
        indices per head and free step, as `next_free` does per head, not tokens: `nbytes` does not count them."""
        ahead, device = np.arange(self.generated, self.room)[:, None], self.kv.device
        slots = list(_on(self.next_free + ahead, device).unbind(0))
        self.starts = _on(np.asarray(self.win.start, dtype=np.int64), device)
        cols = [None] * len(slots) if self._open is None else list(
            _on(self.seg.kept_end_w[:, None] + ahead[:, None], device).unbind(0))
        self.steps = Steps(self.generated, slots, cols)
        self._views = None if self.uniform else [self._strided(b, w + self.room)
                                                 for b, w in zip(self.win.buckets, self.seg.bucket_reach, strict=True)]

    def _hold(self, kv: torch.Tensor) -> None:
        self.kv, self.k, self.v = kv, kv[:, :self.key_dim], kv[:, self.key_dim:]

    def _mask(self, device: torch.device) -> torch.Tensor:
        """(1, heads, 1, reach + room) bool: what each window may read now (its kept and generated entries)."""
        j = np.arange(self.reach + self.room)
        mine = (j >= self.seg.first_w[:, None]) & (j < self.seg.kept_end_w[:, None] + self.generated)
        return _on(mine[None, :, None], device)

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
        is_open = self._open if self._open is not None else self._mask(self.kv.device)  # (a layer read by bounds)
        if len(self.buckets) == 1:
            return [(*self._views[0], torch.where(is_open, self._zero, self._ninf))]
        return [(k, v, torch.where(is_open[:, b.lo:b.hi, :, :k.shape[2]], self._zero, self._ninf))
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
        return native.dense_entries(self)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer holds for its tokens."""
        held = [self.kv, self.positions, self._open] if self.compressed else [self.keys, self.values]
        return [t for t in held if t is not None]

    def nbytes(self) -> int:
        """Bytes of the tensors actually allocated for this layer."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # the kind's interface (`base.LayerKind`)
    name = "per-head"
    compressible = True
    keeps_positions = False  # every slot's position is held (always on a sliding layer: its window drops by them)

    def select_rows(self, indices: torch.Tensor) -> None:
        if not self.compressed:  # still dense (prefill): rows as transformers selects them
            native.select_rows(self, indices)
            return
        if native.has_state(self):  # a hybrid layer's state (its keys are the segments)
            native.select_rows_of_state(self, indices)
        self.select_sequences(indices.tolist())

    def row_entries(self, row: int, batch: int) -> int:
        if not self.compressed:
            return native.dense_row_entries(self, batch)
        h = self.heads // batch
        return sum(self.lens[row * h:(row + 1) * h]) + h * self.generated

    def ideal(self, full: int, appended: int, row: int = 0, batch: int = 1) -> int:
        if not self.compressed:
            return full
        h = self.heads // batch
        return sum(self.kept_prompt[row * h:(row + 1) * h]) + h * appended

    def kept_counts(self, row: int = 0, batch: int = 1) -> list[int] | None:
        if not self.compressed:
            return None
        h = self.heads // batch
        return self.kept_prompt[row * h:(row + 1) * h]

    def spare_room(self, q: int, masked: bool | None = None) -> tuple[float, float] | None:
        """(bytes this layer may hold beyond its tokens after growing for `q`, bytes one free slot per head costs):
        its free slots, each masked window's columns (bool per window and slot) and a sliding layer's positions.
        `masked`: as if the layer held a mask or not (the benchmarks compare backends); default: as it is."""
        if not self.compressed:
            return None
        entry = self.kv.shape[-1] * self.kv.element_size()
        per_entry = 0 if self.positions is None else self.positions.element_size()
        masked = self._open is not None if masked is None else masked and not self.uniform
        mask = self.heads if masked else 0
        generated = self.generated - self._keep_from(q) + q
        filled = sum(self.lens) + self.heads * generated
        return (self.slack * filled * entry - filled * per_entry - mask * (self.reach + generated),
                self.heads * (entry + per_entry) + mask)

    def overflows(self, q: int) -> bool:
        return self.compressed and self.generated + q > self.room

    def grow(self, q: int, free: int) -> None:
        if self.compressed and (self.room != self.generated + q + free or self._keep_from(q)):
            self._grow(q, free)

    def reads(self, key: torch.Tensor) -> bool:
        return self.compressed and self.returned is key

    def attend(self, module, query, key, value, attention_mask, scaling: float, softcap: float | None,
               sinks: torch.Tensor | None = None):
        return readers.attend(self, query, scaling, softcap, sinks=sinks), None


def free_slots(kinds: list[LayerKind], q: int, **how) -> int:
    """Free slots per head that the layers growing together (`LayerKind.spare_room`), grown for `q` new tokens, can
    all have while what they hold beyond their tokens' own bytes (free slots, each masked window's columns, sliding
    layers' positions) stays within their slack of those bytes: an early stop right after the growth is the worst
    case. 0 where a single slot would already break that (a tiny cache): the room then grows at every token."""
    spare = per_slot = 0.0
    for kind in kinds:
        room = kind.spare_room(q, **how)
        if room is not None:
            spare += room[0]
            per_slot += room[1]
    return max(0, math.floor(spare / per_slot)) if per_slot else 0


def _on(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host-computed array (indices, a mask) on `device`: free on the CPU. On CUDA it goes through pinned
    memory, so the copy is queued without waiting for the kernels before it (one from pageable memory may)."""
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class HybridHeadKVLayer(HeadKVLayer, LinearAttentionAndFullAttentionLayer):
    """A hybrid layer (attention beside a Mamba or linear-attention state in the same layer): its keys and values
    are compressed per head, its state stays exactly as transformers keeps it."""

    def __init__(self, sliding_window: int | None = None, slack: float = SLACK, number_of_states: int = 1) -> None:
        HeadKVLayer.__init__(self, sliding_window, slack)
        LinearAttentionAndFullAttentionLayer.__init__(self, number_of_states=number_of_states)

    def tensors(self) -> list[torch.Tensor]:
        return HeadKVLayer.tensors(self)

