"""The full/streaming split kind: some KV heads keep every token, the others a few sink tokens and a rolling window.

RazorAttention, DuoAttention and RLKV run a layer's heads as two pools: the important heads keep their whole cache
and grow with every generated token; every other head keeps its first `sink` tokens and the most recent ones, the
oldest evicted as each new token arrives, so its memory stays constant however long the generation. Both pools are
dense (every head of a pool holds the same positions), so attention is two fused calls per layer, whatever the
number of heads: the full pool's keys (b, full heads, tokens, dim), and a ring buffer (b, streaming heads,
sink + recent, dim) whose slots the new tokens overwrite in turn (`methods/split.py` says which heads are which).

At `compress`, a head that keeps every prompt position is a full head; the others must all keep the same positions
(the sink, then the most recent ones): that count is the ring's capacity. A prompt no longer than the ring leaves
every head full. Within one step of several new tokens, the streaming heads read the window as of the step's last
token. One sequence per cache (a batch's prompts would split their heads differently).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer, LinearAttentionAndFullAttentionLayer

from headprof.errors import HeadprofError
from headprof.kv import native
from headprof.kv.base import LayerKind
from headprof.kv.readers import per_row
from headprof.kv.readers.sdpa import dense

GROWTH = 0.04  # the full pool grows by this share of its tokens (at least 16 slots): within 5% of what it holds


class SplitLayer(LayerKind, DynamicLayer):
    """Dense during prefill; after `compress`, a growing pool for the full heads and a ring for the streaming ones."""

    name = "full/streaming split"
    compressible = True
    max_rows = 1

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0  # positions so far (prompt + generated)
        self.heads = 0
        self.prompt_len = 0
        self.full_heads = self.stream_heads = None  # (n,) long: which KV heads are in each pool
        self.fk = self.fv = None  # (1, full heads, room, dim): the full pool, `self.tokens` of it filled
        self.rk = self.rv = None  # (1, streaming heads, capacity, dim): the ring
        self.ring_pos: torch.Tensor | None = None  # (capacity,) int32: the position each ring slot holds
        self.tokens = 0  # tokens in the full pool
        self.filled = 0  # ring slots holding a token
        self.sink = 0  # ring slots that are never overwritten (the first kept tokens)
        self.cursor = 0  # the next rolling slot to overwrite, counted from `sink`
        self.kept_prompt: list[int] = []
        self.kept_ring = 0  # prompt tokens each streaming head kept
        self.returned: torch.Tensor | None = None
        self._compressed = False

    @property
    def compressed(self) -> bool:
        return self._compressed

    @property
    def capacity(self) -> int:
        return 0 if self.rk is None else self.rk.shape[2]

    def update(self, key_states, value_states, *args, **kwargs):
        q = key_states.shape[-2]
        self.seen += q
        if not self.compressed:
            return super().update(key_states, value_states, *args, **kwargs)
        if self.fk is not None and self.fk.shape[1]:
            if self.tokens + q > self.fk.shape[2]:
                self._grow(q)
            self.fk[:, :, self.tokens:self.tokens + q] = key_states.index_select(1, self.full_heads)
            self.fv[:, :, self.tokens:self.tokens + q] = value_states.index_select(1, self.full_heads)
        self.tokens += q
        if self.capacity:
            slots = self._slots(q)  # host ints, known ahead: no synchronisation
            at = torch.tensor(slots, device=key_states.device)
            self.rk.index_copy_(2, at, key_states.index_select(1, self.stream_heads))
            self.rv.index_copy_(2, at, value_states.index_select(1, self.stream_heads))
            self.ring_pos.index_copy_(0, at, torch.arange(self.seen - q, self.seen, device=at.device,
                                                          dtype=self.ring_pos.dtype))
        self.returned = key_states
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def _slots(self, q: int) -> list[int]:
        """Ring slots for `q` new tokens: free ones first, then the oldest of the rolling part in turn."""
        out = []
        for _ in range(q):
            if self.filled < self.capacity:
                out.append(self.filled)
                self.filled += 1
            else:
                out.append(self.sink + self.cursor)
                self.cursor = (self.cursor + 1) % (self.capacity - self.sink)
        return out

    def _grow(self, q: int) -> None:
        room = self.tokens + q + max(16, math.ceil(GROWTH * (self.tokens + q)))
        pad = room - self.fk.shape[2]
        self.fk = torch.nn.functional.pad(self.fk, (0, 0, 0, pad))
        self.fv = torch.nn.functional.pad(self.fv, (0, 0, 0, pad))

    def compress(self, keep: list[torch.Tensor]) -> None:
        keys, values = self.keys, self.values  # (1, heads, seq, dim)
        batch, heads, seq = keys.shape[:3]
        if batch != 1 or len(keep) != heads:
            raise HeadprofError(f"a {self.name} layer holds one sequence: {len(keep)} selections for {batch} "
                                f"sequences x {heads} KV heads")
        device = keys.device
        full = [h for h, k in enumerate(keep) if k.numel() == seq]
        stream = [h for h in range(heads) if h not in full]
        if stream:
            ring = keep[stream[0]].to(device)
            if any(not torch.equal(keep[h].to(device), ring) for h in stream):
                raise HeadprofError(f"a {self.name} layer's streaming heads must keep the same positions")
            self.rk = keys[:, stream][:, :, ring].contiguous()
            self.rv = values[:, stream][:, :, ring].contiguous()
            self.ring_pos = ring.to(torch.int32)
            self.filled = self.kept_ring = self.rk.shape[2]
            gaps = torch.nonzero(ring != torch.arange(len(ring), device=device))  # once, at compress
            self.sink = int(gaps[0]) if len(gaps) else len(ring)
            self.sink = min(self.sink, max(0, self.filled - 1))
        self.full_heads = torch.tensor(full, dtype=torch.long, device=device)
        self.stream_heads = torch.tensor(stream, dtype=torch.long, device=device)
        self.fk, self.fv = keys[:, full].contiguous(), values[:, full].contiguous()
        self.tokens, self.heads, self.prompt_len = seq, heads, seq
        self.kept_prompt = [int(k.numel()) for k in keep]
        self._order = np.argsort(np.array(full + stream))  # pool order -> KV head order
        self.inverse = torch.tensor(self._order, dtype=torch.long, device=device)
        self.keys, self.values = keys.new_empty((1, heads, 0, keys.shape[-1])), values.new_empty(
            (1, heads, 0, values.shape[-1]))
        self._compressed = True

    # the kind's interface (`base.LayerKind`)

    def select_rows(self, indices: torch.Tensor) -> None:
        if not self.compressed:
            native.select_rows(self, indices)
        elif indices.numel() != 1:
            raise HeadprofError(f"a {self.name} layer holds one sequence")

    def _full_count(self) -> int:
        return 0 if self.full_heads is None else len(self.full_heads)

    def entries(self) -> int:
        if not self.compressed:
            return native.dense_entries(self)
        return self._full_count() * self.tokens + (self.heads - self._full_count()) * self.filled

    def row_entries(self, row: int, batch: int) -> int:
        return self.entries()

    def nbytes(self) -> int:
        if not self.compressed:
            return native.dense_bytes(self)
        held = [self.fk, self.fv, self.rk, self.rv, self.ring_pos]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def ideal(self, full: int, appended: int, row: int = 0, batch: int = 1) -> int:
        if not self.compressed:
            return full
        streaming = self.heads - self._full_count()
        return self._full_count() * (self.prompt_len + appended) + streaming * min(self.capacity,
                                                                                   self.kept_ring + appended)

    def kept_counts(self, row: int = 0, batch: int = 1) -> list[int] | None:
        return self.kept_prompt if self.compressed else None

    def reads(self, key: torch.Tensor) -> bool:
        return self.compressed and self.returned is key

    def attend(self, module, query, key, value, attention_mask, scaling: float, softcap: float | None,
               sinks: torch.Tensor | None = None):
        """Each pool in one call: the query heads of the full KV heads over the full pool (causal among the new
        tokens), those of the streaming heads over the ring (what it holds, no later position)."""
        b, hq, q, d = query.shape
        group = hq // self.heads
        rows = query.reshape(b, self.heads, group * q, d)  # KV head h's query heads and new tokens as rows
        row_sinks = None if sinks is None else per_row(sinks, self.heads, q).expand(b, -1, -1)
        parts = []
        qpos = self.seen - q + torch.arange(q, device=query.device).repeat(group)[:, None]  # row r: token r % q
        if len(self.full_heads):
            mask = None
            if q > 1:
                kpos = self.seen - self.tokens + torch.arange(self.tokens, device=query.device)[None, :]
                mask = torch.where(kpos > qpos, float("-inf"), 0.0).to(query.dtype)
            parts.append(dense(rows.index_select(1, self.full_heads), self.fk[:, :, :self.tokens],
                               self.fv[:, :, :self.tokens], scaling, softcap, mask,
                               None if row_sinks is None else row_sinks.index_select(1, self.full_heads)))
        if len(self.stream_heads):
            mask = None
            if q > 1 or self.filled < self.capacity:
                hidden = (self.ring_pos[None, :] > qpos) | (torch.arange(self.capacity, device=query.device)
                                                             >= self.filled)[None, :]
                mask = torch.where(hidden, float("-inf"), 0.0).to(query.dtype)
            parts.append(dense(rows.index_select(1, self.stream_heads), self.rk, self.rv, scaling, softcap, mask,
                               None if row_sinks is None else row_sinks.index_select(1, self.stream_heads)))
        out = torch.cat(parts, 1).index_select(1, self.inverse)  # back to KV-head order
        if q == 1:
            return out.reshape(b, 1, hq, -1), None
        return out.reshape(b, hq, q, -1).transpose(1, 2), None


class HybridSplitLayer(SplitLayer, LinearAttentionAndFullAttentionLayer):
    """A hybrid layer (attention beside a Mamba or linear-attention state): its heads split, its state as
    transformers keeps it."""

    def __init__(self, number_of_states: int = 1) -> None:
        SplitLayer.__init__(self)
        LinearAttentionAndFullAttentionLayer.__init__(self, number_of_states=number_of_states)
