"""A KV cache that holds a different number of prompt tokens in every KV head.

A compressed layer keeps two parts:

- the **prefix**: the prompt tokens each KV head kept, packed head after head in one (N, dim) buffer
  (head h at [starts[h], starts[h] + lens[h])). It never changes after compression, so it holds exactly
  the kept tokens, and its layout is the one a varlen attention kernel reads (`cu_seqlens`).
- the **tail**: the generated tokens, which every head receives alike, in a dense (heads, room, dim)
  buffer. Appending a step is one slice write per layer; the room grows in small steps (a few percent of
  what the layer holds), so an early stop leaves little unused.

Attention over a compressed layer is one call per layer for all KV heads (`attention.py`). Positions
keep counting from the prompt length, so RoPE continues where the prompt ended. A layer may also carry a
sliding window (Gemma-style layers compressed inside their window): keys older than the window are
masked by position.

Uncompressed layers (the full cache, or sliding-window layers left as the model keeps them) are
transformers' own layers; the cache mixes both kinds.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

GROWTH = 0.02  # tail room grows by this share of what a head holds (and at least the step's tokens)


class HeadKVLayer(DynamicLayer):
    """Dense during prefill; after `compress`, a packed per-head prefix and a dense tail."""

    def __init__(self, sliding_window: int | None = None, growth: float = GROWTH) -> None:
        super().__init__()
        self.sliding_window = sliding_window
        self.growth = growth
        self.seen = 0  # positions so far (prompt + appended)
        self.prompt_len = 0
        self.pk: torch.Tensor | None = None  # (N, dim) kept prompt keys, packed by head
        self.pv: torch.Tensor | None = None
        self.lens: list[int] = []  # kept tokens per head (host copy: sizes are decided on the host)
        self.uniform = True
        self.cu_seqlens: torch.Tensor | None = None  # (heads + 1,) int32, for varlen kernels
        self.positions: torch.Tensor | None = None  # (N,) positions of kept tokens (sliding layers only)
        self.tk: torch.Tensor | None = None  # (heads, room, dim) generated keys
        self.tv: torch.Tensor | None = None
        self.t = 0  # tokens in the tail
        self.t0 = 0  # position of tail[0] minus the prompt length (sliding layers drop old tail entries)
        self.returned: torch.Tensor | None = None
        self.head_of: torch.Tensor | None = None  # (N,) int16 head of each packed entry (unequal lengths)
        self.head_ids: torch.Tensor | None = None

    @property
    def compressed(self) -> bool:
        return self.pk is not None


    def update(self, key_states, value_states, *args, **kwargs):
        q = key_states.shape[-2]
        self.seen += q
        if not self.compressed:
            return super().update(key_states, value_states, *args, **kwargs)
        if self.t + q > self.tk.shape[1]:
            self._grow(q)
        self.tk[:, self.t:self.t + q] = key_states[0]
        self.tv[:, self.t:self.t + q] = value_states[0]
        self.t += q
        self.returned = key_states  # attention recognises this call's keys and reads the layer itself
        return key_states, value_states

    def compress(self, keep: list[torch.Tensor]) -> None:
        """Keep positions keep[h] (sorted) of KV head h; free the dense tensors."""
        keys, values = self.keys, self.values  # (1, heads, seq, dim)
        if keys.shape[0] != 1:
            raise ValueError("head-level compression supports batch size 1")
        heads, dim = keys.shape[1], keys.shape[-1]
        device = keys.device
        self.lens = [int(k.numel()) for k in keep]
        self.uniform = len(set(self.lens)) == 1  # every head keeps the same count: a (heads, len) view
        head_of = torch.repeat_interleave(torch.arange(heads, device=device),
                                          torch.tensor(self.lens, device=device))
        pos = torch.cat([k.to(device) for k in keep])
        self.pk = keys[0, head_of, pos].contiguous()
        self.pv = values[0, head_of, pos].contiguous()
        # otherwise which head each packed entry belongs to (int16: 2 bytes per entry, counted in nbytes)
        self.head_ids = torch.arange(heads, device=device, dtype=torch.int16)
        self.head_of = None if self.uniform else head_of.to(torch.int16)
        cu = [0]
        for n in self.lens:
            cu.append(cu[-1] + n)
        self.cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
        self.positions = pos if self.sliding_window is not None else None
        self.prompt_len = keys.shape[2]
        self.tk = keys.new_empty(heads, self._step(1), dim)
        self.tv = values.new_empty(heads, self.tk.shape[1], dim)
        self.t = self.t0 = 0
        self.keys = self.values = None

    def _step(self, q: int) -> int:
        per_head = self.pk.shape[0] / max(len(self.lens), 1) + self.t
        return max(q, math.ceil(self.growth * per_head))

    def _grow(self, q: int) -> None:
        """Reallocate the tail with room for `q` more tokens plus one growth step."""
        keep_from = 0
        if self.sliding_window is not None:  # entries the window has passed are never read again
            keep_from = max(0, self.t + q - self.sliding_window)
        live = self.t - keep_from
        room = live + q + self._step(q)
        tk, tv = self.tk.new_empty(self.tk.shape[0], room, self.tk.shape[2]), self.tv.new_empty(
            self.tv.shape[0], room, self.tv.shape[2])
        tk[:, :live], tv[:, :live] = self.tk[:, keep_from:self.t], self.tv[:, keep_from:self.t]
        self.tk, self.tv, self.t, self.t0 = tk, tv, live, self.t0 + keep_from

    def prefix_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Keys and values of the prefix for a batched matmul against queries (heads, rows, dim).

        Equal lengths: (heads, len, dim) views, no mask. Otherwise the packed (N, dim) buffer as it is, with a
        (heads, 1, N) mask of each head's own entries: no copy, at the price of scoring every query head
        against every kept token (cheap on CPU; CUDA uses a varlen kernel instead). Also returns the
        positions, broadcastable the same way (sliding-window layers), else None.
        """
        heads = len(self.lens)
        pos = self.positions
        if self.uniform:
            n = self.lens[0]
            return (self.pk.view(heads, n, -1), self.pv.view(heads, n, -1), None,
                    None if pos is None else pos.view(heads, 1, n))
        own = self.head_of[None, :] == self.head_ids[:, None]
        return self.pk, self.pv, own[:, None, :], None if pos is None else pos[None, None, :]

    def head_kv(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions) of head h, prefix then tail: the obvious per-head view (reference)."""
        a, n = int(self.cu_seqlens[h]), self.lens[h]
        pos = (self.positions[a:a + n] if self.positions is not None
               else torch.full((n,), -1, dtype=torch.long, device=self.pk.device))
        tail_pos = self.prompt_len + self.t0 + torch.arange(self.t, device=self.pk.device)
        return (torch.cat([self.pk[a:a + n], self.tk[h, :self.t]]), torch.cat([self.pv[a:a + n], self.tv[h, :self.t]]),
                torch.cat([pos, tail_pos]))

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def entries(self) -> int:
        """KV entries (tokens x KV heads) in use."""
        if self.compressed:
            return self.pk.shape[0] + len(self.lens) * self.t
        return _dense_entries(self)

    def nbytes(self) -> int:
        """Bytes of the tensors actually allocated for this layer."""
        tensors = [self.pk, self.pv, self.tk, self.tv, self.head_of] if self.compressed else [self.keys, self.values]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _dense_entries(layer) -> int:
    keys = getattr(layer, "keys", None)
    return 0 if keys is None or keys.numel() == 0 else keys.shape[1] * keys.shape[2]


class HeadKVCache(Cache):
    """One layer per model layer: `HeadKVLayer` where heads are compressed, transformers' own otherwise.

    `kinds[i]` is "compress" (a full-attention layer, or a sliding layer compressed inside its window when
    `windows[i]` is set), or "keep" (the layer as the model keeps it: its window, or everything).
    """

    def __init__(self, kinds: list[str], windows: list[int | None], growth: float = GROWTH) -> None:
        layers = [HeadKVLayer(w, growth) if kind == "compress"
                  else DynamicSlidingWindowLayer(w) if w else DynamicLayer()
                  for kind, w in zip(kinds, windows, strict=True)]
        super().__init__(layers=layers)

    def compressed_layer(self, layer_idx: int, key: torch.Tensor) -> HeadKVLayer | None:
        """The compressed layer whose `update` just returned `key` (None for any other cache's keys)."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if isinstance(layer, HeadKVLayer) and layer.compressed and layer.returned is key:
            return layer
        return None

    def compress(self, layer: int, keep: list[torch.Tensor]) -> None:
        self.layers[layer].compress(keep)

    def entries(self) -> int:
        return sum(layer.entries() if isinstance(layer, HeadKVLayer) else _dense_entries(layer)
                   for layer in self.layers)

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            if isinstance(layer, HeadKVLayer):
                total += layer.nbytes()
            elif getattr(layer, "keys", None) is not None:
                total += layer.keys.nbytes + layer.values.nbytes
        return total
