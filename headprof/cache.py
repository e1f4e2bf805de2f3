"""A KV cache that holds a different number of tokens in every KV head, and attention over it.

Each layer starts dense (prefill attends over the whole prompt), then `compress` keeps only the chosen
positions: one flat K buffer and one flat V buffer per layer, a segment per KV head with room for the
tokens still to be generated. Appending a decoded token writes one row per head in place; nothing is
copied per step (a segment grows by reallocation, doubling its spare room, only if it fills up).
Positions keep counting from the original prompt length, so RoPE continues where the prompt ended.

The attention function in capture.py recognises these buffers (`varlen_layer`) and attends per head
over its segment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer


class HeadKVLayer(DynamicLayer):
    """Dense until `compress`; then per-KV-head segments [begin, begin + length) of flat buffers."""

    def __init__(self, reserve: int, sliding_window: int | None = None) -> None:
        super().__init__()
        self.reserve = max(1, reserve)
        self.sliding_window = sliding_window
        self.seen = 0
        self.flat_k: torch.Tensor | None = None
        self.flat_v: torch.Tensor | None = None
        self.begin: list[int] = []
        self.length: list[int] = []
        self.end_cap: list[int] = []  # one past the last slot a head may use

    @property
    def compressed(self) -> bool:
        return self.flat_k is not None

    def update(self, key_states, value_states, *args, **kwargs):
        self.seen += key_states.shape[-2]
        if not self.compressed:
            return super().update(key_states, value_states, *args, **kwargs)
        q = key_states.shape[-2]
        for h in range(len(self.begin)):
            if self.begin[h] + self.length[h] + q > self.end_cap[h]:
                self._grow(q)
            at = self.begin[h] + self.length[h]
            self.flat_k[at:at + q] = key_states[0, h]
            self.flat_v[at:at + q] = value_states[0, h]
            self.length[h] += q
            if self.sliding_window is not None and self.length[h] > self.sliding_window:
                drop = self.length[h] - self.sliding_window
                self.begin[h] += drop
                self.length[h] -= drop
        k, v = self.flat_k, self.flat_v
        k.headprof_layer = self  # marks the buffers for the attention function
        return k, v

    def compress(self, keep: list[torch.Tensor]) -> None:
        """Keep positions keep[h] (sorted) of KV head h; free the dense tensors."""
        keys, values = self.keys[0], self.values[0]  # (kv_heads, seq, dim)
        sizes = [int(k.numel()) for k in keep]
        total = sum(sizes) + self.reserve * len(keep)
        self.flat_k = keys.new_empty(total, keys.shape[-1])
        self.flat_v = values.new_empty(total, values.shape[-1])
        self.begin, self.length, self.end_cap = [], [], []
        at = 0
        for h, idx in enumerate(keep):
            n = sizes[h]
            self.flat_k[at:at + n] = keys[h, idx]
            self.flat_v[at:at + n] = values[h, idx]
            self.begin.append(at)
            self.length.append(n)
            at += n + self.reserve
            self.end_cap.append(at)
        self.keys = self.values = None

    def _grow(self, q: int) -> None:
        """Reallocate with twice the spare room per head (rare: only past the planned new tokens)."""
        self.reserve = max(2 * self.reserve, q)
        old_k, old_v = self.flat_k, self.flat_v
        total = sum(self.length) + self.reserve * len(self.length)
        self.flat_k = old_k.new_empty(total, old_k.shape[-1])
        self.flat_v = old_v.new_empty(total, old_v.shape[-1])
        at = 0
        for h in range(len(self.begin)):
            n, b = self.length[h], self.begin[h]
            self.flat_k[at:at + n] = old_k[b:b + n]
            self.flat_v[at:at + n] = old_v[b:b + n]
            self.begin[h] = at
            at += n + self.reserve
            self.end_cap[h] = at

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def entries(self) -> int:
        """KV entries (tokens x KV heads) held."""
        if self.compressed:
            return sum(self.length)
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[1] * self.keys.shape[2]

    def nbytes(self) -> int:
        """Bytes of the tensors actually allocated for this layer."""
        tensors = [self.flat_k, self.flat_v] if self.compressed else [self.keys, self.values]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class HeadKVCache(Cache):
    """One `HeadKVLayer` per model layer; `reserve` = tokens each head may still receive."""

    def __init__(self, num_layers: int, reserve: int, sliding_windows: list[int | None] | None = None) -> None:
        windows = sliding_windows or [None] * num_layers
        super().__init__(layers=[HeadKVLayer(reserve, w) for w in windows])

    def compress(self, layer: int, keep: list[torch.Tensor]) -> None:
        self.layers[layer].compress(keep)

    def entries(self) -> int:
        return sum(layer.entries() for layer in self.layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def head_lengths(self) -> list[list[int]]:
        return [list(layer.length) for layer in self.layers]


def varlen_layer(key: torch.Tensor) -> HeadKVLayer | None:
    return getattr(key, "headprof_layer", None)


def varlen_attention(layer: HeadKVLayer, query: torch.Tensor, scaling: float,
                     softcap: float | None) -> torch.Tensor:
    """Attention of `query` (1, heads, q, dim) over each KV head's own segment; returns (1, q, heads, dim).

    The q new tokens are the last q entries of every segment; they attend causally among themselves.
    """
    _, heads, q, _ = query.shape
    kv_heads = len(layer.begin)
    group = heads // kv_heads
    out = query.new_empty(1, q, heads, layer.flat_v.shape[-1])
    for h in range(kv_heads):
        b, n = layer.begin[h], layer.length[h]
        k, v = layer.flat_k[b:b + n], layer.flat_v[b:b + n]
        qg = query[0, h * group:(h + 1) * group]  # (group, q, dim)
        if softcap is None and q == 1:
            o = F.scaled_dot_product_attention(qg, k[None], v[None], scale=scaling)
        else:
            logits = torch.matmul(qg.float(), k.float().T) * scaling
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            if q > 1:
                allowed = torch.arange(n, device=k.device)[None, :] <= torch.arange(n - q, n, device=k.device)[:, None]
                logits = logits.masked_fill(~allowed, float("-inf"))
            o = torch.matmul(torch.softmax(logits, dim=-1).to(v.dtype), v)
        out[0, :, h * group:(h + 1) * group] = o.transpose(0, 1)
    return out
